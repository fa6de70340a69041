"""SQLAlchemy 2 models of the index (patients, studies, series, instances) and the job queue.

Every timestamp is timezone-aware UTC (:class:`UTCDateTime`). Patient name, ID and birth date
live here only; they are never logged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from storage.job_types import JobState
from storage.records import SKIP_REASON_LENGTH, TEXT_LIMITS, UID_LENGTH


def _text_column(name: str) -> String:
    """A text column sized by :data:`storage.records.TEXT_LIMITS`."""
    return String(TEXT_LIMITS[name])




def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that always binds and returns aware UTC datetimes.

    SQLite keeps no zone, so values are normalised to UTC before they are stored (making
    string comparison correct) and marked UTC when loaded. Naive inputs are refused.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC (naive on SQLite, which cannot store a zone)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of all storage models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Patient(Base):
    """A patient as identified by the sending system (PHI: never logged)."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(_text_column("patient_id"), unique=True)
    patient_name: Mapped[str] = mapped_column(_text_column("patient_name"), default="")
    patient_birth_date: Mapped[str] = mapped_column(_text_column("patient_birth_date"), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """A study (Study Instance UID) and what a dashboard shows about it."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    study_date: Mapped[str] = mapped_column(_text_column("study_date"), default="")
    accession_number: Mapped[str] = mapped_column(_text_column("accession_number"), default="")
    study_description: Mapped[str] = mapped_column(_text_column("study_description"), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series as received, with the counters the completeness check reads."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    modality: Mapped[str] = mapped_column(_text_column("modality"), default="")
    body_part_examined: Mapped[str] = mapped_column(_text_column("body_part_examined"), default="")
    series_description: Mapped[str] = mapped_column(_text_column("series_description"), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_type: Mapped[str] = mapped_column(_text_column("image_type"), default="")
    is_derived: Mapped[bool] = mapped_column(Boolean, default=False)
    produced_by_node: Mapped[bool] = mapped_column(Boolean, default=False)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    calling_ae_title: Mapped[str] = mapped_column(_text_column("ae_title"), default="")
    completeness_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enhanceable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    skip_reason: Mapped[str | None] = mapped_column(String(SKIP_REASON_LENGTH), nullable=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP Instance (one file in the file store)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_fk: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae_title: Mapped[str] = mapped_column(_text_column("ae_title"), default="")

    series: Mapped[Series] = relationship(back_populates="instances")


class ProducedSeries(Base):
    """Series Instance UIDs this node generated (never queued even if ImageType is altered)."""

    __tablename__ = "produced_series"

    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """One enhancement of one series by one rule."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_not_before", "state", "not_before"),
        Index("ix_jobs_series_rule", "series_fk", "rule"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    rule: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    stage: Mapped[str] = mapped_column(String(64), default="")
    stage_seconds: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    series: Mapped[Series] = relationship()


class SentInstance(Base):
    """A derived instance already delivered to a destination (to resume a partial send)."""

    __tablename__ = "sent_instances"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
