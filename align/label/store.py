"""The labeling store: rounds of response pairs, labelers, assignments and labels, in SQL.

SQLAlchemy 2 over a database URL: SQLite by default (one file; WAL journal, foreign keys on, every
write one `BEGIN IMMEDIATE` transaction), and nothing SQLite-only in the queries, so a PostgreSQL
URL can serve it later (the upsert uses `ON CONFLICT`, which both dialects have; slot claims lock
the round rows with `SELECT ... FOR UPDATE`, a no-op on SQLite, whose writers are serialised anyway).

Tables:
    rounds       number (unique), labels_per_pair, settings (JSON: how the pairs were made)
    pairs        round, prompt (JSON messages ending with a user turn), response_a, response_b,
                 settings_a / settings_b (JSON: the generation settings of each response), category, source
    labelers     name (unique), token_hash (sha256 hex of the bearer token; the token itself is
                 never stored), is_admin
    assignments  (pair, labeler): the labeler is to label the pair
    labels       (labeler, pair) UNIQUE, choice a|b|tie|skip, rating (RATINGS; only for a|b),
                 a_safe / b_safe, created_at, updated_at, revision. A label needs its assignment
                 (composite foreign key); submitting again overwrites it (the latest wins).
    gold_answers pair -> its known answer (a | b): the pair is a gold pair, offered to every labeler
                 to measure their accuracy, never counted in the round's progress nor exported
    round_closures  round -> closed_at: a closed round offers nothing and takes no labels (its
                 export is final); separate tables, so a store made before them opens unchanged

Assignment: a (non-gold) pair is labeled by `labels_per_pair` labelers. `create_round` assigns each pair to
that many labelers of a pool (round-robin, so the load is even); a labeler who asks for work and
has none pending claims a free slot of a pair they have not seen (`next_pairs`). A skip releases
its slot: the pair is offered to another labeler, so skips do not cost the pair its votes. A gold
pair has no slot limit: every labeler gets it (assigned to the whole pool, or claimed like any pair,
at its place in the round's order, so it comes mixed among the others).

Every public method is one transaction: an exception inside it (bad input, a killed process)
leaves nothing of it behind.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from align.data.schema import CATEGORIES, RATINGS
from align.errors import AlignError

CHOICES = ("a", "b", "tie", "skip")
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class StoreError(AlignError):
    """A labeling request the store refuses; the subclass says why (the server maps it to a status)."""


class InvalidInput(StoreError):
    """The input breaks a rule of the schema (HTTP 422)."""


class NotFound(StoreError):
    """No such round, pair, label or labeler (HTTP 404)."""


class Forbidden(StoreError):
    """The labeler may not touch this pair or label (HTTP 403)."""


class Conflict(StoreError):
    """The name or round number is taken (HTTP 409)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    # SQLite returns naive datetimes; every stored time is UTC.
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


def hash_token(token: str) -> str:
    """sha256 hex of a bearer token: what the labelers table stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_label(choice: Any, rating: Any, a_safe: Any, b_safe: Any) -> None:
    """Raise `InvalidInput` unless the fields make one valid label.

    a | b: a rating in RATINGS (how much better the chosen one is) and both safety flags.
    tie: no rating (a tie is no preference) and both safety flags.
    skip: no rating; safety flags optional.
    """
    if choice not in CHOICES:
        raise InvalidInput(f"choice {choice!r}: must be one of {', '.join(CHOICES)}")
    if choice in ("a", "b"):
        if rating not in RATINGS:
            raise InvalidInput(f"choice {choice!r} needs a rating, one of {', '.join(RATINGS)} (got {rating!r})")
    elif rating is not None:
        raise InvalidInput(
            f"choice {choice!r} takes no rating (got {rating!r}); a rating says how much better the chosen response is"
        )
    for name, value in (("a_safe", a_safe), ("b_safe", b_safe)):
        if value is None and choice != "skip":
            raise InvalidInput(f"choice {choice!r} needs {name} (true or false): mark each response safe or unsafe")
        if value is not None and not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true, false or null (got {value!r})")


def check_pair(pair: dict, where: str) -> None:
    """Raise `InvalidInput` unless ``pair`` (prompt, response_a, response_b, category, ...) would make
    valid preference records whichever response wins (the checks of align/data/validate.py)."""
    from align.data.validate import BadRow, check_record

    record = {
        "prompt": pair.get("prompt"),
        "chosen": pair.get("response_a"),
        "rejected": pair.get("response_b"),
        "rating": RATINGS[0],
        "category": pair.get("category", "helpfulness"),
        "chosen_safe": None,
        "rejected_safe": None,
        "margin": None,
        "source": pair.get("source") or "label",
    }
    try:
        check_record(record, "preference")
    except BadRow as e:
        text = str(e).replace("'chosen'", "'response_a'").replace("'rejected'", "'response_b'")
        raise InvalidInput(f"{where}: {text}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise InvalidInput(f"{where}: not a pair of prompt messages and two responses ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Tables


class Base(DeclarativeBase):
    pass


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    labels_per_pair: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    __table_args__ = (CheckConstraint("labels_per_pair >= 1", name="ck_rounds_labels_per_pair"),)


class Pair(Base):
    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[list] = mapped_column(JSON)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    settings_a: Mapped[dict] = mapped_column(JSON)
    settings_b: Mapped[dict] = mapped_column(JSON)
    category: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    __table_args__ = (
        CheckConstraint("category IN (%s)" % ", ".join(f"'{c}'" for c in CATEGORIES), name="ck_pairs_category"),
    )


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Assignment(Base):
    __tablename__ = "assignments"
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    labeler_id: Mapped[int] = mapped_column(Integer, index=True)
    pair_id: Mapped[int] = mapped_column(Integer, index=True)
    choice: Mapped[str] = mapped_column(String(4))
    rating: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    a_safe: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    b_safe: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    __table_args__ = (
        UniqueConstraint("labeler_id", "pair_id", name="uq_labels_labeler_pair"),
        # A label exists only for an assignment (and so for an existing pair and labeler).
        ForeignKeyConstraint(
            ["pair_id", "labeler_id"],
            ["assignments.pair_id", "assignments.labeler_id"],
            ondelete="CASCADE",
            name="fk_labels_assignment",
        ),
        CheckConstraint("choice IN (%s)" % ", ".join(f"'{c}'" for c in CHOICES), name="ck_labels_choice"),
        CheckConstraint(
            "(choice IN ('a', 'b') AND rating IN (%s)) OR (choice IN ('tie', 'skip') AND rating IS NULL)"
            % ", ".join(f"'{r}'" for r in RATINGS),
            name="ck_labels_rating",
        ),
    )


class GoldAnswer(Base):
    __tablename__ = "gold_answers"
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True)
    answer: Mapped[str] = mapped_column(String(1))
    __table_args__ = (CheckConstraint("answer IN ('a', 'b')", name="ck_gold_answer"),)


class RoundClosure(Base):
    __tablename__ = "round_closures"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


def _is_gold():
    """Whether the pair (correlated with `Pair`) is a gold pair."""
    return exists().where(GoldAnswer.pair_id == Pair.id)


def _is_open():
    """Whether the pair's round (correlated with `Pair`) is not closed."""
    return ~exists().where(RoundClosure.round_id == Pair.round_id)


# ---------------------------------------------------------------------------------------------------
# Plain results (no ORM object leaves the store)


@dataclass(frozen=True)
class LabelerInfo:
    id: int
    name: str
    is_admin: bool


def _taken_slots():
    """Per pair (correlated with `Pair`): its assignments whose labeler has not skipped it."""
    other = aliased(Assignment)
    skipped = exists().where(
        Label.pair_id == other.pair_id, Label.labeler_id == other.labeler_id, Label.choice == "skip"
    )
    return (
        select(func.count())
        .select_from(other)
        .where(other.pair_id == Pair.id, ~skipped)
        .correlate(Pair)
        .scalar_subquery()
    )


def _pair_dict(p: Pair, number: int, with_settings: bool = False) -> dict:
    out = {
        "id": p.id,
        "round": number,
        "prompt": p.prompt,
        "response_a": p.response_a,
        "response_b": p.response_b,
        "category": p.category,
    }
    if with_settings:
        out.update(settings_a=p.settings_a, settings_b=p.settings_b, source=p.source)
    return out


def _label_dict(lab: Label, labeler: str, number: int) -> dict:
    return {
        "id": lab.id,
        "pair_id": lab.pair_id,
        "round": number,
        "labeler": labeler,
        "choice": lab.choice,
        "rating": lab.rating,
        "a_safe": lab.a_safe,
        "b_safe": lab.b_safe,
        "revision": lab.revision,
        "created_at": _iso(lab.created_at),
        "updated_at": _iso(lab.updated_at),
    }


def database_url(db: str | Path) -> str:
    """A database URL from a URL or a SQLite file path (``labels.db`` -> ``sqlite:///labels.db``)."""
    text = str(db)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        raise AlignError(f"--db {path}: is a directory; give the database file, e.g. {path / 'labels.db'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


# ---------------------------------------------------------------------------------------------------
# The store


class LabelStore:
    """All reads and writes of the labeling loop; thread-safe (one instance serves a web server)."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        self.engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            self._sqlite_setup()
        # Writers of one process queue here rather than spin in SQLite's busy handler; writers of
        # other processes (another server, the CLI) still wait on SQLite's lock (busy_timeout).
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._writer = self.engine.execution_options(label_write=True)
        # Under the write lock: two processes opening a new database do not both create the tables.
        with self._writer.begin() as conn:
            Base.metadata.create_all(conn)

    @classmethod
    def open(cls, db: str | Path) -> "LabelStore":
        """The store at a URL or a SQLite file path (created if missing)."""
        return cls(database_url(db))

    def close(self) -> None:
        self.engine.dispose()

    def _sqlite_setup(self) -> None:
        memory = self.url in ("sqlite://", "sqlite:///:memory:")

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # pysqlite's own transaction handling is off: the "begin" hook below emits BEGIN itself.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn):
            # A writer takes the write lock at BEGIN: a read-then-write transaction that only asks
            # for it at its first write can fail with SQLITE_BUSY when another writer got there first.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("label_write") else "BEGIN")

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            with Session(self._writer, expire_on_commit=False) as s, s.begin():
                yield s
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------------------------ labelers
    def add_labeler(self, name: str, admin: bool = False) -> str:
        """Create a labeler; return their bearer token (shown once: only its sha256 is stored)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInput(f"labeler name {name!r}: use 1-64 letters, digits or _ . @ -")
        token = secrets.token_urlsafe(32)
        with self._write() as s:
            if s.scalar(select(Labeler.id).where(Labeler.name == name)) is not None:
                raise Conflict(f"labeler {name!r} exists; pick another name (or reset their token)")
            s.add(Labeler(name=name, token_hash=hash_token(token), is_admin=bool(admin)))
        return token

    def reset_token(self, name: str) -> str:
        """Give labeler ``name`` a new token (the old one stops working); return it."""
        token = secrets.token_urlsafe(32)
        with self._write() as s:
            labeler = s.scalar(select(Labeler).where(Labeler.name == name))
            if labeler is None:
                raise NotFound(f"no labeler named {name!r}")
            labeler.token_hash = hash_token(token)
        return token

    def authenticate(self, token: Optional[str]) -> Optional[LabelerInfo]:
        """The labeler holding ``token``, or None."""
        if not token:
            return None
        with self._read() as s:
            row = s.execute(
                select(Labeler.id, Labeler.name, Labeler.is_admin).where(Labeler.token_hash == hash_token(token))
            ).first()
        return LabelerInfo(row.id, row.name, bool(row.is_admin)) if row else None

    def labelers(self) -> list[LabelerInfo]:
        with self._read() as s:
            rows = s.execute(select(Labeler.id, Labeler.name, Labeler.is_admin).order_by(Labeler.id)).all()
        return [LabelerInfo(r.id, r.name, bool(r.is_admin)) for r in rows]

    # -------------------------------------------------------------------------------------- rounds
    def create_round(
        self,
        pairs: Sequence[dict],
        *,
        number: Optional[int] = None,
        labels_per_pair: int = 1,
        assign_to: Optional[Sequence[str]] = None,
        settings: Optional[dict] = None,
        gold: Sequence[dict] = (),
    ) -> int:
        """Store a batch of pairs as round ``number`` (None = one after the highest); return the number.

        Each pair is a dict with ``prompt`` (messages ending with a user turn), ``response_a``,
        ``response_b`` and optionally ``settings_a`` / ``settings_b`` (dicts), ``category``
        (helpfulness | safety; default helpfulness) and ``source``. Each pair is assigned to
        ``labels_per_pair`` labelers of ``assign_to`` (names; None = every non-admin labeler, [] = none:
        labelers claim the slots as they ask for work), round-robin.

        ``gold``: pairs as above plus ``answer`` (a | b, the better response), placed at evenly spaced
        points of the round's order and assigned to every labeler of the pool.
        """
        if not isinstance(labels_per_pair, int) or isinstance(labels_per_pair, bool) or labels_per_pair < 1:
            raise InvalidInput(f"labels_per_pair={labels_per_pair!r}: must be an integer >= 1")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 1):
            raise InvalidInput(f"round={number!r}: must be an integer >= 1")
        if not pairs:
            raise InvalidInput("a round needs at least one pair")
        for i, pair in enumerate(gold):
            if not isinstance(pair, dict) or pair.get("answer") not in ("a", "b"):
                raise InvalidInput(f"gold pair {i}: needs answer 'a' or 'b' (the better response)")
        for i, pair in enumerate([*pairs, *gold]):
            if not isinstance(pair, dict):
                raise InvalidInput(f"pair {i}: expected an object, got {type(pair).__name__}")
            check_pair(pair, f"pair {i}")
            for key in ("settings_a", "settings_b"):
                if not isinstance(pair.get(key, {}), dict):
                    raise InvalidInput(f"pair {i}: {key} must be an object of generation settings")
        with self._write() as s:
            if number is None:
                number = (s.scalar(select(func.max(Round.number))) or 0) + 1
            elif s.scalar(select(Round.id).where(Round.number == number)) is not None:
                raise Conflict(f"round {number} exists; give another round number (or none: the next free one)")
            if assign_to is None:
                pool = list(s.scalars(select(Labeler.id).where(Labeler.is_admin.is_(False)).order_by(Labeler.id)))
            else:
                pool = []
                for name in assign_to:
                    lid = s.scalar(select(Labeler.id).where(Labeler.name == name))
                    if lid is None:
                        raise NotFound(f"assign_to: no labeler named {name!r}; add them first")
                    if lid not in pool:
                        pool.append(lid)
            rnd = Round(number=number, labels_per_pair=labels_per_pair, settings=dict(settings or {}))
            s.add(rnd)
            s.flush()
            k = min(labels_per_pair, len(pool))
            # Gold pair j goes before regular pair floor((j + 1) * n / (g + 1)): spread over the round.
            n, g = len(pairs), len(gold)
            at = {(j + 1) * n // (g + 1) + j: pair for j, pair in enumerate(gold)}
            order = iter(pairs)
            i = 0
            for pos in range(n + g):
                pair = at.get(pos) or next(order)
                row = Pair(
                    round_id=rnd.id,
                    prompt=[{"role": m["role"], "content": m["content"]} for m in pair["prompt"]],
                    response_a=pair["response_a"],
                    response_b=pair["response_b"],
                    settings_a=dict(pair.get("settings_a") or {}),
                    settings_b=dict(pair.get("settings_b") or {}),
                    category=pair.get("category", "helpfulness"),
                    source=str(pair.get("source") or ""),
                )
                s.add(row)
                s.flush()
                if pos in at:
                    s.add(GoldAnswer(pair_id=row.id, answer=pair["answer"]))
                    for lid in pool:
                        s.add(Assignment(pair_id=row.id, labeler_id=lid))
                    continue
                # Consecutive blocks of k distinct labelers: an even load whatever the pool size.
                for j in range(k):
                    s.add(Assignment(pair_id=row.id, labeler_id=pool[(i * k + j) % len(pool)]))
                i += 1
        return number

    def close_round(self, number: int) -> None:
        """Close round ``number`` (again: no-op): its open pairs are no longer offered, and no label of
        it can be added, changed or undone, so its export stays what it was."""
        with self._write() as s:
            rnd = self._round(s, number)
            if s.get(RoundClosure, rnd.id) is None:
                s.add(RoundClosure(round_id=rnd.id))

    def rounds(self) -> list[dict]:
        """Every round with its counts: pairs, assignments, labels (skips apart), pairs fully labeled
        (gold pairs apart: ``gold_pairs``, ``gold_labels``), and whether it is ``closed``."""
        with self._read() as s:
            out = []
            for rnd in s.scalars(select(Round).order_by(Round.number)):
                gold_ids = select(Pair.id).where(Pair.round_id == rnd.id, _is_gold()).scalar_subquery()
                pair_ids = select(Pair.id).where(Pair.round_id == rnd.id, ~_is_gold()).scalar_subquery()
                n_pairs = s.scalar(select(func.count()).select_from(Pair).where(Pair.round_id == rnd.id, ~_is_gold()))
                n_gold = s.scalar(select(func.count()).select_from(Pair).where(Pair.round_id == rnd.id, _is_gold()))
                gold_votes = s.scalar(
                    select(func.count()).select_from(Label).where(Label.pair_id.in_(gold_ids), Label.choice != "skip")
                )
                closed = s.scalar(select(RoundClosure.closed_at).where(RoundClosure.round_id == rnd.id))
                n_assigned = s.scalar(
                    select(func.count()).select_from(Assignment).where(Assignment.pair_id.in_(pair_ids))
                )
                votes = dict(
                    s.execute(
                        select(Label.choice, func.count()).where(Label.pair_id.in_(pair_ids)).group_by(Label.choice)
                    ).all()
                )
                voted = (
                    select(Label.pair_id)
                    .where(Label.pair_id.in_(pair_ids), Label.choice != "skip")
                    .group_by(Label.pair_id)
                    .having(func.count() >= rnd.labels_per_pair)
                )
                n_done = s.scalar(select(func.count()).select_from(voted.subquery()))
                out.append(
                    {
                        "round": rnd.number,
                        "pairs": n_pairs,
                        "labels_per_pair": rnd.labels_per_pair,
                        "assigned": n_assigned,
                        "labels": sum(v for c, v in votes.items() if c != "skip"),
                        "skips": votes.get("skip", 0),
                        "complete_pairs": n_done,
                        "gold_pairs": n_gold,
                        "gold_labels": gold_votes,
                        "closed": closed is not None,
                        "settings": rnd.settings,
                        "created_at": _iso(rnd.created_at),
                    }
                )
        return out

    def _round(self, s: Session, number: int) -> Round:
        rnd = s.scalar(select(Round).where(Round.number == number))
        if rnd is None:
            raise NotFound(f"no round {number}")
        return rnd

    def round_pairs(self, number: int) -> list[dict]:
        """The pairs of a round with their generation settings, ``gold`` (the known answer of a gold
        pair, else None) and all their labels (for export and agreement)."""
        with self._read() as s:
            rnd = self._round(s, number)
            rows = s.execute(
                select(Pair, GoldAnswer.answer)
                .outerjoin(GoldAnswer, GoldAnswer.pair_id == Pair.id)
                .where(Pair.round_id == rnd.id)
                .order_by(Pair.id)
            ).all()
            pairs = {
                p.id: {**_pair_dict(p, number, with_settings=True), "gold": gold, "labels": []} for p, gold in rows
            }
            rows = s.execute(
                select(Label, Labeler.name)
                .join(Labeler, Labeler.id == Label.labeler_id)
                .where(Label.pair_id.in_(list(pairs)))
                .order_by(Label.id)
            ).all()
            for lab, name in rows:
                pairs[lab.pair_id]["labels"].append(_label_dict(lab, name, number))
        return list(pairs.values())

    # ------------------------------------------------------------------------------------ labeling
    def next_pairs(self, labeler_id: int, limit: int = 1, round: Optional[int] = None) -> list[dict]:
        """Up to ``limit`` pairs for a labeler to label, oldest round first: their assigned pairs not
        yet labeled, then free slots they claim (pairs they have no assignment for, with fewer than
        labels_per_pair assignments that are not skips, or gold). A claimed pair stays theirs. Closed
        rounds offer nothing."""
        if limit < 1:
            raise InvalidInput(f"limit={limit}: must be >= 1")
        mine = aliased(Label)
        with self._write() as s:
            round_ids = select(Round.id) if round is None else select(Round.id).where(Round.number == round)
            if round is not None:
                self._round(s, round)
            pending = (
                select(Pair, Round.number)
                .join(Round, Round.id == Pair.round_id)
                .join(Assignment, and_(Assignment.pair_id == Pair.id, Assignment.labeler_id == labeler_id))
                .where(
                    Pair.round_id.in_(round_ids),
                    _is_open(),
                    ~exists().where(mine.pair_id == Pair.id, mine.labeler_id == labeler_id),
                )
                .order_by(Round.number, Pair.id)
                .limit(limit)
            )
            got = [_pair_dict(p, n) for p, n in s.execute(pending).all()]
            if len(got) < limit:
                # PostgreSQL: lock the rounds so two claims cannot both take a pair's last slot.
                list(s.scalars(select(Round.id).where(Round.id.in_(round_ids)).order_by(Round.id).with_for_update()))
                taken = _taken_slots()
                free = (
                    select(Pair, Round.number)
                    .join(Round, Round.id == Pair.round_id)
                    .where(
                        Pair.round_id.in_(round_ids),
                        _is_open(),
                        or_(taken < Round.labels_per_pair, _is_gold()),
                        ~exists().where(Assignment.pair_id == Pair.id, Assignment.labeler_id == labeler_id),
                    )
                    .order_by(Round.number, Pair.id)
                    .limit(limit - len(got))
                )
                for p, n in s.execute(free).all():
                    s.add(Assignment(pair_id=p.id, labeler_id=labeler_id))
                    got.append(_pair_dict(p, n))
        return got

    def submit_label(
        self,
        labeler_id: int,
        pair_id: int,
        choice: str,
        rating: Optional[str] = None,
        a_safe: Optional[bool] = None,
        b_safe: Optional[bool] = None,
    ) -> dict:
        """Store the labeler's label of a pair assigned to them; a second submission replaces the first
        (one row per (labeler, pair), ``revision`` counts the submissions)."""
        check_label(choice, rating, a_safe, b_safe)
        with self._write() as s:
            row = s.execute(
                select(Pair.id, Round.number).join(Round, Round.id == Pair.round_id).where(Pair.id == pair_id)
            ).first()
            if row is None:
                raise NotFound(f"no pair {pair_id}")
            if s.get(Assignment, (pair_id, labeler_id)) is None:
                raise Forbidden(f"pair {pair_id} is not assigned to you; ask for work with GET /api/pairs/next")
            self._check_open(s, pair_id, row.number)
            now = _now()
            values = {"choice": choice, "rating": rating, "a_safe": a_safe, "b_safe": b_safe}
            self._upsert(
                s,
                {
                    "labeler_id": labeler_id,
                    "pair_id": pair_id,
                    **values,
                    "revision": 1,
                    "created_at": now,
                    "updated_at": now,
                },
                {**values, "updated_at": now, "revision": Label.revision + 1},
            )
            lab = s.scalar(
                select(Label)
                .where(Label.labeler_id == labeler_id, Label.pair_id == pair_id)
                .execution_options(populate_existing=True)
            )
            name = s.scalar(select(Labeler.name).where(Labeler.id == labeler_id))
            return _label_dict(lab, name, row.number)

    def _check_open(self, s: Session, pair_id: int, number: int) -> None:
        closed = exists().where(RoundClosure.round_id == Pair.round_id)
        if s.scalar(select(Pair.id).where(Pair.id == pair_id, closed)) is not None:
            raise Conflict(f"round {number} is closed: its labels are exported and can no longer change")

    def undo_last(self, labeler_id: int) -> dict:
        """Delete the labeler's most recently submitted (or resubmitted) label of an open round; return
        ``{"label": the deleted label, "pair": its pair}``. The assignment stays, so the pair is theirs
        to label again."""
        with self._write() as s:
            row = s.execute(
                select(Label, Pair, Round.number)
                .join(Pair, Pair.id == Label.pair_id)
                .join(Round, Round.id == Pair.round_id)
                .where(Label.labeler_id == labeler_id, _is_open())
                .order_by(Label.updated_at.desc(), Label.id.desc())
                .limit(1)
            ).first()
            if row is None:
                raise NotFound("no label to undo in an open round")
            lab, pair, number = row
            name = s.scalar(select(Labeler.name).where(Labeler.id == labeler_id))
            out = {"label": _label_dict(lab, name, number), "pair": _pair_dict(pair, number)}
            s.delete(lab)
        return out

    def _upsert(self, s: Session, insert_values: dict, update_values: dict) -> None:
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(Label).values(**insert_values)
            s.execute(stmt.on_conflict_do_update(index_elements=["labeler_id", "pair_id"], set_=update_values))
            return
        lab = s.scalar(
            select(Label)
            .where(Label.labeler_id == insert_values["labeler_id"], Label.pair_id == insert_values["pair_id"])
            .with_for_update()
        )
        if lab is None:
            s.add(Label(**insert_values))
        else:
            for k, v in update_values.items():
                setattr(lab, k, v)

    def labels_of(self, labeler_id: int, round: Optional[int] = None) -> list[dict]:
        """A labeler's own labels, oldest first."""
        with self._read() as s:
            q = (
                select(Label, Round.number, Labeler.name)
                .join(Pair, Pair.id == Label.pair_id)
                .join(Round, Round.id == Pair.round_id)
                .join(Labeler, Labeler.id == Label.labeler_id)
                .where(Label.labeler_id == labeler_id)
            )
            if round is not None:
                q = q.where(Round.number == round)
            return [_label_dict(lab, name, n) for lab, n, name in s.execute(q.order_by(Label.id)).all()]

    def get_label(self, label_id: int, labeler: LabelerInfo) -> dict:
        """One label; only its labeler (or an admin) may read it."""
        with self._read() as s:
            row = s.execute(
                select(Label, Round.number, Labeler.name)
                .join(Pair, Pair.id == Label.pair_id)
                .join(Round, Round.id == Pair.round_id)
                .join(Labeler, Labeler.id == Label.labeler_id)
                .where(Label.id == label_id)
            ).first()
        if row is None:
            raise NotFound(f"no label {label_id}")
        lab, number, name = row
        if lab.labeler_id != labeler.id and not labeler.is_admin:
            raise Forbidden(f"label {label_id} belongs to another labeler")
        return _label_dict(lab, name, number)

    def progress(self, labeler_id: int) -> dict:
        """``labeled``: the labeler's labels (all rounds); ``assigned``: those plus their assignments
        still to label in open rounds; ``available``: free slots of open rounds they could still claim."""
        with self._read() as s:
            labeled = s.scalar(select(func.count()).select_from(Label).where(Label.labeler_id == labeler_id))
            pending = s.scalar(
                select(func.count())
                .select_from(Assignment)
                .join(Pair, Pair.id == Assignment.pair_id)
                .where(
                    Assignment.labeler_id == labeler_id,
                    _is_open(),
                    ~exists().where(Label.pair_id == Assignment.pair_id, Label.labeler_id == labeler_id),
                )
            )
            taken = _taken_slots()
            available = s.scalar(
                select(func.count())
                .select_from(Pair)
                .join(Round, Round.id == Pair.round_id)
                .where(
                    _is_open(),
                    or_(taken < Round.labels_per_pair, _is_gold()),
                    ~exists().where(Assignment.pair_id == Pair.id, Assignment.labeler_id == labeler_id),
                )
            )
        return {"labeled": labeled, "assigned": labeled + pending, "available": available}

    def counts(self) -> dict:
        """Row counts of every table (for tests and `align label status`)."""
        with self._read() as s:
            return {
                t.__tablename__: s.scalar(select(func.count()).select_from(t))
                for t in (Round, Pair, Labeler, Assignment, Label, GoldAnswer, RoundClosure)
            }
