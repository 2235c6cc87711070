"""job heartbeats, worker id and webhook delivery

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 19:55:32.493107
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('webhook_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('webhook_attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('webhook_next_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('webhook_next_at')
        batch_op.drop_column('webhook_attempts')
        batch_op.drop_column('webhook_status')
        batch_op.drop_column('worker_id')

