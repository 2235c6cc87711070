"""checkpoints: the parent a repair job made them from

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 14:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Null for every checkpoint made before repairs existed: uploads and trained ones have no parent.
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_checkpoint_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_checkpoints_parent_checkpoint_id'), ['parent_checkpoint_id'],
                              unique=False)
        batch_op.create_foreign_key('fk_checkpoints_parent_checkpoint_id', 'checkpoints',
                                    ['parent_checkpoint_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_constraint('fk_checkpoints_parent_checkpoint_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_checkpoints_parent_checkpoint_id'))
        batch_op.drop_column('parent_checkpoint_id')
