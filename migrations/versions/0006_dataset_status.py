"""datasets: status, error and check_started_at (image folders are checked in the background)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 04:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('datasets', sa.Column('status', sa.String(length=16), nullable=False, server_default='ready'))
    op.add_column('datasets', sa.Column('error', sa.Text(), nullable=True))
    op.add_column('datasets', sa.Column('check_started_at', sa.DateTime(timezone=True), nullable=True))
    # image folders registered before were read whole at registration; they are checked again into an index
    op.execute("UPDATE datasets SET status = 'pending' WHERE format = 'image_folder'")


def downgrade() -> None:
    op.drop_column('datasets', 'check_started_at')
    op.drop_column('datasets', 'error')
    op.drop_column('datasets', 'status')
