"""What the cloud tells its user while a run goes on and when it ends.

* :class:`ProgressGrid`: Flower's ``Grid`` with a ``send_and_receive`` that says how many devices
  have replied while a round waits, and turns a device that never replied into an error reply.
* :class:`RejectedReplies`: every rejected reply; on the console one line per cause, round and
  phase with the devices counted, the cause's text once per run, the full text (Ray tracebacks
  included) in ``errors.log``.
* :func:`incomplete_rounds` and :func:`last_evaluation`: whether a run did what it was asked.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Error, Message

from privtune_flwr.schema import SchemaError, content_bytes, read_instruction

log = logging.getLogger("privtune_flwr.cloud")

NO_REPLY = "no reply within the round's timeout"
OVERSIZED = "reply larger than its budget"
NOT_REACHED = "the run stopped before this round"
# Ray's text when it kills a worker for lack of memory; the rest of its report is pages long.
_OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|running low on memory|killed due to .*memory", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")


DEVICE_ERROR = "device error: "  # how the strategy labels an error reply (as against a malformed one)


def short_cause(reason: str, width: int = 160) -> str:
    """One line for a rejected reply: the exception that ended it, not the traceback around it."""
    label = DEVICE_ERROR if reason.startswith(DEVICE_ERROR) else ""
    reason = reason[len(label):]
    if _OUT_OF_MEMORY.search(reason):
        return label + "the device's worker was killed for lack of memory (Ray OutOfMemoryError)"
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    found = [m for m in map(_EXCEPTION_LINE.match, lines) if m]
    if found:  # a chained traceback prints its root cause first (Ray wraps it in ClientAppException)
        name, text = found[0].group(1), (found[0].group(2) or "").strip()
        line = f"{name.rsplit('.', 1)[-1]}: {text}" if text else name.rsplit(".", 1)[-1]
    else:
        line = lines[0] if lines else "(no reason given)"
    line = label + line
    if found:  # the exception's own message is the cause: kept whole (a refusal names its full accepted range)
        return line
    return line if len(line) <= width else line[: width - 1] + "…"


class RejectedReplies:
    """Rejected replies of a run: recorded, summarised per round and phase, and at the end."""

    def __init__(self, output_dir: Path | None = None):
        self.entries: list[dict] = []
        self.errors_log = None if output_dir is None else Path(output_dir) / "errors.log"
        self._reported: set[int] = set()  # entries summarised already (a retried round reuses its number)
        self._said: dict[str, str] = {}  # cause -> where its full text was first shown on the console

    def add(self, server_round: int, phase: str, device: str, reason: str) -> None:
        reason = _ANSI.sub("", reason)  # Ray colours its text
        self.entries.append({"round": server_round, "phase": phase, "device": device, "cause": short_cause(reason), "reason": reason})
        if self.errors_log is not None:
            with self.errors_log.open("a") as f:
                f.write(f"=== round {server_round} {phase}, {device}\n{reason.rstrip()}\n\n")

    def report_phase(self, server_round: int, phase: str) -> None:
        """One console line per cause of this round and phase, naming the devices; a retry of the
        round reports only its own rejections."""
        devices: dict[str, list[str]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            if i not in self._reported and e["round"] == server_round and e["phase"] == phase:
                devices[e["cause"]].append(e["device"])
                self._reported.add(i)
        for names in devices.values():
            names.sort(key=_natural)
        where = f" (full text in {self.errors_log})" if self.errors_log is not None else ""
        for cause, names in devices.items():
            first = self._said.get(cause)
            self._said.setdefault(cause, f"round {server_round} {phase}")
            if first is not None:
                # said before (a retry, a later round): the cause once, then only where it recurs
                kind = cause.split(":")[1].strip() if cause.startswith(DEVICE_ERROR) else cause.split(":")[0]
                log.warning("round %d %s: %d repl%s rejected (%s): %s again, as in %s", server_round, phase, len(names),
                            "y" if len(names) == 1 else "ies", ", ".join(names), kind, first)
                continue
            log.warning("round %d %s: %d repl%s rejected (%s): %s%s", server_round, phase, len(names),
                        "y" if len(names) == 1 else "ies", ", ".join(names), cause, where)

    def summary(self) -> list[str]:
        """One line per device and cause over the whole run, with its count and rounds."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for e in self.entries:
            groups[(e["device"], e["cause"])].append(e["round"])
        return [f"{device}: {len(rounds)}x {cause} (round{'s' if len(set(rounds)) > 1 else ''} "
                f"{', '.join(map(str, sorted(set(rounds))))})" for (device, cause), rounds in sorted(groups.items())]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def as_records(self) -> list[dict]:
        """For results.json: everything but the full text, which is in errors.log."""
        return [{k: v for k, v in e.items() if k != "reason"} for e in self.entries]


def _natural(name: str) -> list:
    """Sort key that puts "device 2" before "device 10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def incomplete_rounds(history: list[dict], rejected: RejectedReplies, num_rounds: int) -> list[dict]:
    """Rounds that did not both train the top and evaluate it, each with what went wrong."""
    rows = {r["round"]: r for r in history}
    out = []
    for rnd in range(1, num_rounds + 1):
        row = rows.get(rnd, {})
        missing = [what for what, key in (("train", "train-loss"), ("evaluate", "test-accuracy")) if key not in row]
        if missing:
            causes = sorted({f"{e['phase']}: {e['cause']}" for e in rejected.entries if e["round"] == rnd})
            out.append({"round": rnd, "did-not": missing, "causes": causes or [NOT_REACHED]})
    return out


def last_evaluation(history: list[dict]) -> dict:
    """The newest round whose evaluation completed (empty if none did)."""
    done = [r for r in history if "test-accuracy" in r]
    return done[-1] if done else {}


class ProgressGrid:
    """A ``Grid`` whose ``send_and_receive`` reports progress and accounts for missing replies.

    Everything else is the wrapped grid's. While replies are outstanding it logs how many devices
    have answered, first after ``first_report`` seconds and then every ``every`` seconds. A
    device that has not replied when the timeout ends gets an error reply (:data:`NO_REPLY`),
    so the strategy reports it like any other failed device.
    """

    def __init__(self, grid, *, first_report: float = 20.0, every: float = 30.0):
        self._grid = grid
        self.first_report, self.every = first_report, every

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         max_reply_bytes: int | None = None) -> list[Message]:
        """Flower's ``send_and_receive``, plus progress, silence turned into errors and
        (``max_reply_bytes``) a byte budget per reply.

        With a budget, replies are pulled one message id at a time and a reply whose payload
        (:func:`~privtune_flwr.schema.content_bytes`) exceeds it is replaced by an error reply
        before the next one is pulled: the cloud holds at most one oversized reply at any moment,
        whatever the devices send, and never keeps one."""
        messages = list(messages)
        if not messages:
            return []
        if not hasattr(self._grid, "push_messages"):  # a grid with send_and_receive only (test doubles)
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            if max_reply_bytes is None:
                return replies
            asked = {m.metadata.message_id: m for m in messages}
            return [_within_budget(r, asked.get(r.metadata.reply_to_message_id, r), max_reply_bytes) for r in replies]
        label = _label(messages[0])
        sent = dict(zip(self._grid.push_messages(messages), messages))
        waiting = set(sent)
        replies: list[Message] = []
        start = time.monotonic()
        next_report = start + self.first_report
        interval = getattr(self._grid, "pull_interval", 0.5)
        while waiting and (timeout is None or time.monotonic() - start < timeout):
            if max_reply_bytes is None:
                got = list(self._grid.pull_messages(waiting))
            else:
                got = []
                for message_id in sorted(waiting):
                    pulled = list(self._grid.pull_messages([message_id]))
                    kept = [_within_budget(reply, sent[message_id], max_reply_bytes) for reply in pulled]
                    dropped = any(k is not r for k, r in zip(kept, pulled))
                    got += kept
                    del pulled
                    if dropped:  # Flower's records hold reference cycles: only the collector frees them
                        gc.collect()
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting and time.monotonic() >= next_report:
                log.info("%s: %d of %d devices replied (%.0f s)", label, len(sent) - len(waiting), len(sent), time.monotonic() - start)
                next_report += self.every
            if waiting:
                time.sleep(interval)
        for message_id in waiting:
            replies.append(Message(Error(code=0, reason=f"{NO_REPLY} ({timeout:.0f} s)"), reply_to=sent[message_id]))
        return [_from_addressee(r, sent) for r in replies]


def send_bounded(grid, messages: Iterable[Message], *, timeout: float | None, max_reply_bytes: int) -> list[Message]:
    """``send_and_receive`` on ``grid`` (a :class:`ProgressGrid`, or any Flower grid, wrapped) with a
    per-reply byte budget."""
    grid = grid if isinstance(grid, ProgressGrid) else ProgressGrid(grid)
    return grid.send_and_receive(messages, timeout=timeout, max_reply_bytes=max_reply_bytes)


def _within_budget(reply: Message, asked: Message, max_bytes: int) -> Message:
    """``reply``, or an error reply to ``asked`` in its place (so from the device it was sent to)
    when its payload holds more than ``max_bytes``."""
    if reply.has_error():
        return reply
    size = content_bytes(reply.content)
    if size <= max_bytes:
        return reply
    return Message(Error(code=0, reason=f"{OVERSIZED}: {size} bytes; this round's plan allows at most {max_bytes} "
                                        "bytes per reply (dropped unread)"), reply_to=asked)


def _from_addressee(reply: Message, sent: dict[str, Message]) -> Message:
    """An error reply as if from the device it answers for. In a deployment the SuperLink writes
    the error of a lost SuperNode itself, with its own node id as the sender (1), so the strategy
    would book it against an unknown node instead of the device it asked."""
    asked = sent.get(reply.metadata.reply_to_message_id)
    if asked is None or not reply.has_error() or reply.metadata.src_node_id == asked.metadata.dst_node_id:
        return reply
    return Message(reply.error, reply_to=asked)


def _label(message: Message) -> str:
    try:
        server_round, _ = read_instruction(message.content)
        return f"round {server_round} {message.metadata.message_type}"
    except SchemaError:  # the fit phase's queries, or the one-off query for each new device's partition
        return {"query.fit": "federation map: asking for the devices' statistics",
                "query.reader": "federation map: a reader round",
                "query.map": "federation map: sending the map for the devices to derive and audit",
                }.get(message.metadata.message_type, "asking new devices for their partition")
