"""datasets: size_bytes (the per-key storage quota counts what is stored)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 17:30:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # datasets registered before count 0 bytes: a migration does not read the storage folder
    op.add_column('datasets', sa.Column('size_bytes', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('datasets', 'size_bytes')
