"""What a TorchScript upload may call, checked twice: from the archive's sources before any of its code runs,
and from the loaded graphs (inside the jail) after.

A TorchScript archive is a zip whose `code/` folder holds every class, method and function of the model as
Python-syntax source (interfaces, script classes and `__setstate__` included); `torch.jit.load` compiles it and
runs each `__setstate__` while loading. So the first check reads that source with `ast` (it is never executed),
and the pickles (`data.pkl`, `constants.pkl`) with `pickletools` (never unpickled), and refuses any op that
`ALLOWED_OPS` (allowed_ops.txt, beside this file) does not name. In serialised TorchScript `torch.NAME` is the
op `aten::NAME` and `ops.NS.NAME` the op `NS::NAME`; bare names are Python builtins the compiler maps to ops.
"""

from __future__ import annotations

import ast
import io
import pickletools
import zipfile
from pathlib import Path

from starvation.checkpoints.errors import CheckpointError, printable

ALLOWED_OPS: frozenset[str] = frozenset(
    line.split("#", 1)[0].strip()
    for line in (Path(__file__).with_name("allowed_ops.txt")).read_text().splitlines()
    if line.split("#", 1)[0].strip()
)

# Builtins the TorchScript compiler resolves by bare name, with the op each becomes. `print` (prim::Print) and
# `fork`/`awaitable` are not here: they are refused by name.
BUILTINS: dict[str, str] = {
    "annotate": "prim::annotate",
    "unchecked_cast": "prim::unchecked_cast",
    "uninitialized": "prim::Uninitialized",
    "isinstance": "prim::isinstance",
    "getattr": "prim::GetAttr",
    "hasattr": "prim::HasAttr",
    "len": "aten::len",
    "int": "aten::Int",
    "float": "aten::Float",
    "bool": "aten::Bool",
    "str": "aten::str",
    "range": "prim::range",
    "enumerate": "prim::enumerate",
    "zip": "prim::zip",
    "min": "prim::min",
    "max": "prim::max",
    "abs": "prim::abs",
    "round": "aten::round",
    "list": "aten::list",
    "tuple": "prim::tuple",
    "divmod": "aten::divmod",
    "all": "aten::all",
    "any": "aten::any",
    "sum": "aten::sum",
    "pow": "aten::pow",
}
NAMES = {
    "CONSTANTS",
    "__annotations__",
    "inf",
    "nan",
    "infj",
    "nanj",
    "None",
    "True",
    "False",
    "Exception",
    "NotImplementedError",
}
TYPE_NAMES = {
    "Tensor",
    "List",
    "Dict",
    "Optional",
    "Tuple",
    "Union",
    "Final",
    "NoneType",
    "Any",
    "Future",
    "Module",
    "Interface",
    "NamedTuple",
    "Enum",
    "Device",
    "Stream",
    "number",
    "Await",
    "int",
    "float",
    "bool",
    "str",
    "complex",
    "NOT_ALLOWED",
}

MAX_CODE_BYTES = 16 << 20  # every source file of the archive together
MAX_ENTRIES = 100_000
MAX_PICKLE_BYTES = 64 << 20
# The pickles may name these globals only: TorchScript's own unpickler resolves nothing else but the archive's
# classes (`__torch__.*`, whose `__setstate__` is in the checked sources).
PICKLE_GLOBALS = {
    "torch._utils _rebuild_tensor",
    "torch._utils _rebuild_tensor_v2",
    "torch._utils _rebuild_parameter",
    "torch._utils _rebuild_qtensor",
    "torch._utils _rebuild_sparse_tensor",
    "collections OrderedDict",
    "torch.jit._pickle build_intlist",
    "torch.jit._pickle build_floatlist",
    "torch.jit._pickle build_boollist",
    "torch.jit._pickle build_tensorlist",
    "torch.jit._pickle build_doublelist",
    "torch.jit._pickle restore_type_tag",
    "torch.jit._pickle build_tensor_from_id",
    "torch device",
}
_STORAGES = {
    f"torch {kind}Storage"
    for kind in (
        "Float",
        "Double",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexFloat",
        "ComplexDouble",
    )
}


def archive_sources(data: bytes) -> dict[str, str]:
    """The `code/` sources of a TorchScript archive, by name; CheckpointError if it is not one we can read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            "load_failed", "The TorchScript archive is not a readable zip file.", detail=str(exc)[:200]
        ) from None
    if len(entries) > MAX_ENTRIES:
        raise CheckpointError("load_failed", f"The TorchScript archive holds more than {MAX_ENTRIES} files.")
    code = [e for e in entries if e.filename.endswith(".py") and "/code/" in f"/{e.filename}"]
    if sum(e.file_size for e in code) > MAX_CODE_BYTES:
        raise CheckpointError("load_failed", f"The TorchScript archive's code is over {MAX_CODE_BYTES} bytes.")
    if not code:
        raise CheckpointError("load_failed", "The TorchScript archive holds no code.")
    sources = {}
    for entry in code:
        try:
            sources[entry.filename] = _read_member(archive, entry, entry.file_size).decode("utf-8")
        except (UnicodeDecodeError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(
                "load_failed", "The TorchScript archive's code cannot be read.", detail=str(exc)[:200]
            ) from None
    for entry in entries:  # the pickles: which globals they would make
        if entry.filename.endswith(".pkl") and not entry.filename.endswith(".debug_pkl"):
            _check_pickle(_read_member(archive, entry, MAX_PICKLE_BYTES), entry.filename)
    return sources


def _read_member(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> bytes:
    """A member, read at most to `limit` bytes whatever its header claims (a zip bomb stops there)."""
    if entry.file_size > limit:
        raise CheckpointError("load_failed", f"A file in the TorchScript archive is over {limit} bytes.")
    with archive.open(entry) as member:
        content = member.read(limit + 1)
    if len(content) > limit:
        raise CheckpointError("load_failed", f"A file in the TorchScript archive is over {limit} bytes.")
    return content


def _check_pickle(data: bytes, name: str) -> None:
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "SHORT_BINSTRING", "BINSTRING"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                _check_global(str(arg).replace("\n", " ", 1), name)
            elif opcode.name == "STACK_GLOBAL":
                _check_global(f"{strings[-2]} {strings[-1]}" if len(strings) >= 2 else "?", name)
            elif opcode.name in ("INST", "OBJ", "REDUCE_EX"):
                raise CheckpointError(
                    "forbidden_op",
                    f"The TorchScript archive's {printable(name)} builds objects in a way TorchScript archives do not.",
                )
    except CheckpointError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on damaged streams
        raise CheckpointError(
            "load_failed", "The TorchScript archive's pickles are damaged.", detail=str(exc)[:200]
        ) from None


def _check_global(qualified: str, name: str) -> None:
    module = qualified.split(" ", 1)[0]
    if qualified in PICKLE_GLOBALS or qualified in _STORAGES:
        return
    if module.startswith("__torch__") and ".torch.classes" not in f".{module}" and "classes" != module.split(".")[-1]:
        return  # a class of the archive's own code, checked with it
    raise CheckpointError(
        "forbidden_op",
        f"The TorchScript archive's {printable(name)} refers to "
        f"{printable(qualified)[:80]!r}, which uploaded models may not use.",
    )


def check_archive(data: bytes) -> set[str]:
    """Refuse (CheckpointError `forbidden_op`) a TorchScript archive whose sources call an op outside
    ALLOWED_OPS, before any of it runs; returns the ops it calls."""
    ops, refused = archive_ops(data)
    refused |= ops - ALLOWED_OPS
    if refused:
        raise forbidden(refused)
    return ops


def archive_ops(data: bytes) -> tuple[set[str], set[str]]:
    """The ops a TorchScript archive's sources can reach, and the names in them that are no op we know."""
    ops: set[str] = set()
    refused: set[str] = set()
    for name, source in archive_sources(data).items():
        try:
            tree = ast.parse(source, filename=name)
            _OpCollector(ops, refused).visit(tree)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise CheckpointError("load_failed", "The TorchScript archive's code is not what torch writes.") from None
    return ops, refused


def forbidden(refused: set[str]) -> CheckpointError:
    shown = ", ".join(printable(op)[:60] for op in sorted(refused)[:5])
    return CheckpointError(
        "forbidden_op",
        f"The TorchScript model calls {len(refused)} op(s) that uploaded models may not use: {shown}. "
        "docs/security.md lists the ops allowed.",
    )


class _OpCollector(ast.NodeVisitor):
    """Every op a source file can reach: each `torch.X` and `ops.NS.X` wherever it appears (so an alias such as
    `f = torch.from_file` is seen), each bare builtin, and refusals for free names it does not know."""

    def __init__(self, ops: set[str], refused: set[str]) -> None:
        self.ops, self.refused = ops, refused
        self.bound: list[set[str]] = [set()]

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        names = {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
        names |= {a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None}
        names |= {t.id for n in ast.walk(node) for t in _targets(n) if isinstance(t, ast.Name)}
        self.bound.append(names)
        for child in [*node.body, *node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if child is not None:
                self.visit(child)
        self.bound.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in node.body:  # bases and annotations are types, not code
            if isinstance(child, ast.AnnAssign):
                if child.value is not None:
                    self.visit(child.value)
            else:
                self.visit(child)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_Import(self, node: ast.AST) -> None:
        self.refused.add("import")

    visit_ImportFrom = visit_Import

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("annotate", "unchecked_cast", "isinstance", "uninitialized"):
            self.ops.add(BUILTINS[func.id])
            for arg in node.args[1:] if func.id != "uninitialized" else ():
                self.visit(arg)  # the first argument is a type
            return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _dotted(node)
        if chain is None:
            self.visit(node.value)  # an attribute of a value, e.g. (self).forward or x.shape
            return
        root = chain[0]
        if root == "torch":
            self.ops.add(f"aten::{chain[1]}" if len(chain) == 2 else "torch." + ".".join(chain[1:]))
        elif root == "ops":
            self.ops.add(f"{chain[1]}::{chain[2]}" if len(chain) == 3 else "ops." + ".".join(chain[1:]))
        elif root == "__torch__":
            if "classes" in chain:  # TorchBind classes run C++ of their own
                self.refused.add(".".join(chain)[:80])
        elif root == "CONSTANTS" or self._is_bound(root):
            pass
        else:
            self.visit(node.value)

    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if not isinstance(node.ctx, ast.Load) or self._is_bound(name) or name in NAMES or name in TYPE_NAMES:
            return
        if name in BUILTINS:
            self.ops.add(BUILTINS[name])
        elif name == "print":
            self.ops.add("prim::Print")
        elif name in ("fork", "awaitable"):
            self.ops.add(f"prim::{name}")
        else:
            self.refused.add(name[:60])

    def _is_bound(self, name: str) -> bool:
        return any(name in scope for scope in self.bound) or name in ("self",)


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return [t for target in node.targets for t in ast.walk(target)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.comprehension)):
        return list(ast.walk(node.target))
    if isinstance(node, ast.withitem) and node.optional_vars is not None:
        return list(ast.walk(node.optional_vars))
    return []


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def graph_ops(module) -> set[str]:
    """The ops of a loaded TorchScript module: every method of every submodule, inlined (the second wall, in the
    jail, after loading; calls through interfaces are not inlined, and the source check saw their bodies)."""
    import torch

    ops: set[str] = set()

    def visit(block) -> None:
        for node in block.nodes():
            ops.add(node.kind())
            for inner in node.blocks():
                visit(inner)

    for submodule in module.modules():
        scripted = getattr(submodule, "_c", None)
        if scripted is None:
            continue
        for name in scripted._method_names():
            graph = scripted._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            visit(graph.block())
    return ops
