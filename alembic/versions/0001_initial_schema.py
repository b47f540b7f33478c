"""Calls, utterances, turn metrics and call events.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 04:43:14+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("call_sid", sa.String(length=64), nullable=False),
        sa.Column("stream_sid", sa.String(length=64), nullable=True),
        sa.Column("from_number", sa.String(length=64), nullable=True),
        sa.Column("to_number", sa.String(length=64), nullable=True),
        sa.Column("direction", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=40), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calls")),
        sa.UniqueConstraint("call_sid", name=op.f("uq_calls_call_sid")),
    )
    # Listing newest first, and filtering by caller / called number.
    op.create_index("ix_calls_started_at_id", "calls", ["started_at", "id"])
    op.create_index("ix_calls_from_number", "calls", ["from_number"])
    op.create_index("ix_calls_to_number", "calls", ["to_number"])

    op.create_table(
        "call_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_id"],
            ["calls.id"],
            name=op.f("fk_call_events_call_id_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_events")),
    )
    op.create_index("ix_call_events_call_id_at", "call_events", ["call_id", "at"])

    op.create_table(
        "turn_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.Integer(), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("endpoint_ms", sa.Float(), nullable=True),
        sa.Column("stt_ms", sa.Float(), nullable=True),
        sa.Column("stt_wait_ms", sa.Float(), nullable=True),
        sa.Column("llm_first_token_ms", sa.Float(), nullable=True),
        sa.Column("llm_first_sentence_ms", sa.Float(), nullable=True),
        sa.Column("tts_first_chunk_ms", sa.Float(), nullable=True),
        sa.Column("v2v_ms", sa.Float(), nullable=True),
        sa.Column("overhead_ms", sa.Float(), nullable=True),
        sa.Column("heard_v2v_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["call_id"],
            ["calls.id"],
            name=op.f("fk_turn_metrics_call_id_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turn_metrics")),
        sa.UniqueConstraint("call_id", "turn", name=op.f("uq_turn_metrics_call_id_turn")),
    )

    op.create_table(
        "utterances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.Integer(), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("generated_text", sa.Text(), nullable=True),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_id"],
            ["calls.id"],
            name=op.f("fk_utterances_call_id_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_utterances")),
        sa.UniqueConstraint("call_id", "seq", name=op.f("uq_utterances_call_id_seq")),
    )
    op.create_index("ix_utterances_call_id_started_at", "utterances", ["call_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_utterances_call_id_started_at", table_name="utterances")
    op.drop_table("utterances")
    op.drop_table("turn_metrics")
    op.drop_index("ix_call_events_call_id_at", table_name="call_events")
    op.drop_table("call_events")
    op.drop_index("ix_calls_to_number", table_name="calls")
    op.drop_index("ix_calls_from_number", table_name="calls")
    op.drop_index("ix_calls_started_at_id", table_name="calls")
    op.drop_table("calls")
