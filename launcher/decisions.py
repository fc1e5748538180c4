"""The decisions a run takes from its stages' metrics: a gate passed or failed, a retry, a fallback, the chosen
variant; and so which instance's output each manifest stage hands on.

A stage with a gate or variants has a record in the ledger's "decisions", by stage name:

    {"rule": <digest of the rule>, "outcome": "pending" | "pass" | "fallback" | "stop",
     "hand_on": <instance whose final/ later stages read>, "next": <instance that must run next>, "events": [...]}

`decide` is a pure function of the ledger and the rule. A recorded event stands while the rule and what it was
decided on (the digests of the instance and of the stages its conditions read) are unchanged: on resume and in
every Slurm job the same decisions are replayed, not taken again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from contract import gates
from contract.layout import EXIT_GATE_STOPPED
from launcher import ledger
from launcher.resolve import Resolved

Outcome = Literal["pending", "pass", "fallback", "stop"]
Wanted = Literal["yes", "away", "undecided", "stopped"]


def groups(stages: Iterable[Resolved]) -> dict[str, list[Resolved]]:
    """The instances of each manifest stage, in manifest order."""
    out: dict[str, list[Resolved]] = {}
    for r in stages:
        out.setdefault(r.group, []).append(r)
    return out


def decide_all(data: dict[str, Any], stages: list[Resolved]) -> dict[str, dict[str, Any]]:
    """Every stage's decision record (in memory; `settle` saves them), in manifest order."""
    records: dict[str, dict[str, Any]] = {}
    for name, members in groups(stages).items():
        if members[0].rule is not None:
            records[name] = decide(name, members, data, records)
    return records


def outputs_of(data: dict[str, Any], stages: list[Resolved],
               records: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{manifest stage: the output record of the instance it hands on, plus "instance"}: what later stages read,
    for the stages that hand on something now. `records`: `decide_all(data, stages)` when the caller has them."""
    records = decide_all(data, stages) if records is None else records
    hand_ons = {name: inst for name in groups(stages) if (inst := _hand_on(records, data, name))}
    return {name: data["stages"][inst]["output"] | {"instance": inst} for name, inst in hand_ons.items()}


def decide(name: str, members: list[Resolved], data: dict[str, Any],
           records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The decision record of stage `name` (instances `members`), given the records of the stages before it."""
    rule = members[0].rule
    assert rule is not None
    old = (data.get("decisions") or {}).get(name) or {}
    recorded = old.get("events", []) if old.get("rule") == rule.digest else []
    events: list[dict[str, Any]] = []

    def record(outcome: Outcome, **fields: Any) -> dict[str, Any]:
        return {"rule": rule.digest, "outcome": outcome, "hand_on": None, "next": None, **fields, "events": events}

    def keep(event: dict[str, Any]) -> dict[str, Any]:
        """The recorded event decided on the same basis, else this new one."""
        same = next((e for e in recorded if _key(e) == _key(event)), None)
        if same is None:
            event["time"] = ledger.now()
        events.append(same or event)
        return same or event

    if rule.select is not None:
        waiting = [r.name for r in members if not _done(data, r.name)]
        if waiting:
            return record("pending", next=waiting[0])
        goal, metric = rule.select
        values = {r.name: data["stages"][r.name].get("metrics", {}).get(metric) for r in members}
        finite = {n: v for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        chosen = (max if goal == "max" else min)(finite, key=lambda n: finite[n]) if finite else None
        event = keep({"kind": "select", "goal": goal, "metric": metric, "values": values, "chosen": chosen,
                      "basis": {n: _digest(data, n) for n in values}})
        if event["chosen"] is None:
            return record("stop", reason=f"no variant reports a finite {metric}")
        attempts = [event["chosen"]]
    else:
        attempts = [r.name for r in members]
    for k, attempt in enumerate(attempts):
        if not _done(data, attempt):
            return record("pending", next=attempt)
        if not rule.checks:
            return record("pass", hand_on=attempt)
        owners = {o for c in rule.checks for o in c.owners.values()}
        reads = {o: _hand_on(records, data, o) for o in sorted(owners)}
        checks = [_check(c, data["stages"][attempt].get("metrics") or {}, reads, data) for c in rule.checks]
        passed = all(c["passed"] for c in checks)
        retry = not passed and rule.on_fail == "retry" and k + 1 < len(attempts)
        action = "pass" if passed else "retry" if retry else "fallback" if rule.fallback else "stop"
        event = keep({"kind": "gate", "attempt": attempt, "checks": checks, "passed": passed, "action": action,
                      "basis": {attempt: _digest(data, attempt)} | {o: _digest(data, i) for o, i in reads.items()}}
                     | ({"next": attempts[k + 1]} if retry else {}))
        if event["passed"]:
            return record("pass", hand_on=attempt)
        if retry:
            continue
        if rule.fallback is not None:
            target = _hand_on(records, data, rule.fallback)
            if target is None:
                return record("stop", reason=f"the fallback stage {rule.fallback} hands on nothing")
            return record("fallback", hand_on=target, fallback=rule.fallback)
        return record("stop", reason=fail_text(name, event))
    raise AssertionError("unreachable: the last attempt returns")


def _check(check: Any, own: dict[str, Any], reads: dict[str, str | None], data: dict[str, Any]) -> dict[str, Any]:
    """One condition against the metrics: {condition, left, compare, right, passed}, or {…, problem} when a value is
    missing."""
    def lookup(ref: gates.Ref) -> float:
        if ref.owner is None:
            metrics, whose = own, "this stage"
        else:
            inst = reads.get(check.owners[ref.owner])
            metrics = (data["stages"].get(inst) or {}).get("metrics") or {} if inst else {}
            whose = f"stage {check.owners[ref.owner]}"
        v = metrics.get(ref.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{ref}: {whose} reports {'no' if v is None else 'a non-finite'} {ref.metric}")
        return float(v)

    c = check.condition
    try:
        left, right = gates.value(c.left, lookup), gates.value(c.right, lookup)
    except (ValueError, ZeroDivisionError) as e:
        return {"condition": c.text, "left": None, "right": None, "passed": False, "problem": str(e)}
    return {"condition": c.text, "left": left, "compare": c.compare, "right": right,
            "passed": gates.COMPARE[c.compare](left, right)}


def _key(event: dict[str, Any]) -> tuple[Any, ...]:
    """What an event was decided on: its kind and the digests of what it read."""
    return event.get("kind"), sorted((event.get("basis") or {}).items(), key=str)


def _hand_on(records: dict[str, dict[str, Any]], data: dict[str, Any], name: str) -> str | None:
    """The instance stage `name` hands on: its decision's, or (a stage without gate or variants) itself once done."""
    if name in records:
        rec = records[name]
        return rec["hand_on"] if rec["outcome"] in ("pass", "fallback") else None
    return name if _done(data, name) else None


def _done(data: dict[str, Any], name: str) -> bool:
    e = data["stages"].get(name) or {}
    return e.get("state") == "done" and bool(e.get("output"))


def _digest(data: dict[str, Any], name: str | None) -> str | None:
    return ((data["stages"].get(name) or {}).get("output") or {}).get("digest") if name else None


# ----------------------------------------------------------------- the run's view of them


def superseded(data: dict[str, Any], ref: dict[str, Any]) -> str | None:
    """Why a stage input `ref` (an earlier stage's output, as a stage's ledger entry records it) no longer follows
    the ledger's decisions: the decision of the manifest stage it was read for (a gate since tightened, say) now
    hands on another instance, waits, or stopped the run. None when it still follows them, or no decision
    concerns it."""
    if ref.get("source") != "stage" or not ref.get("stage"):
        return None
    group = ref.get("named") or str(ref["stage"]).split("@", 1)[0]
    rec = (data.get("decisions") or {}).get(group)
    if rec is None or (rec.get("outcome") in ("pass", "fallback") and rec.get("hand_on") == ref["stage"]):
        return None
    now = {"stop": "it stopped the run", "pending": f"it waits for {rec.get('next')}"}.get(
        str(rec.get("outcome")), f"it hands on {rec.get('hand_on')}")
    return f"built on {ref['stage']}, which the decision on {group} no longer hands on ({now})"


def stale_stages(data: dict[str, Any]) -> dict[str, str]:
    """{done stage: why} for each stage one of whose inputs a decision no longer hands on (`superseded`): made
    under an earlier decision, it is stale until it runs again on what the decisions hand on now."""
    out = {}
    for name, entry in data["stages"].items():
        if entry.get("state") != "done":
            continue
        for key, value in (entry.get("inputs") or {}).items():
            refs = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
            why = next((w for ref in refs if key != "data" and (w := superseded(data, ref))), None)
            if why:
                out[name] = why
                break
    return out


def wanted(r: Resolved, records: dict[str, dict[str, Any]], order: list[str]) -> Wanted:
    """Whether instance `r` is to run: yes; away (a decision made it unneeded: a retry whose earlier attempt
    passed); undecided (a retry whose earlier attempt is not decided yet); stopped (a stage before it stopped the
    run)."""
    if stopped_at(records, order[:order.index(r.group)]):
        return "stopped"
    if r.role != "retry":
        return "yes"
    rec = records[r.group]
    asked = any(e.get("next") == r.name for e in rec["events"])
    if asked:
        return "yes"
    return "undecided" if rec["outcome"] == "pending" else "away"


def not_needed(record: dict[str, Any]) -> str:
    """Why a retry attempt is not run: what its stage's decision was."""
    if record["outcome"] == "fallback":
        return f"not needed: the gate failed and {record['fallback']} hands on instead"
    if record["outcome"] == "pass":
        return f"not needed: {record['hand_on']} passed its gate"
    return f"not needed: {record.get('reason') or record['outcome']}"


def stopped_at(records: dict[str, dict[str, Any]], names: Iterable[str]) -> str | None:
    """The first of `names` whose decision stopped the run."""
    return next((n for n in names if (records.get(n) or {}).get("outcome") == "stop"), None)


def settle(led: ledger.Ledger, stages: list[Resolved]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Take every decision the ledger allows now and record it (under the ledger's lock): (the records, one line
    per new event)."""
    records = decide_all(led.data, stages)
    before = led.data.get("decisions") or {}
    said = []
    for name, rec in records.items():
        previous = before.get(name) or {}
        old = [_key(e) for e in previous.get("events", [])] if previous.get("rule") == rec["rule"] else []
        said += [f"== {name}: {describe(e)}" for e in rec["events"] if _key(e) not in old]
    stale = {n for n in before if n not in records}
    if records != {n: r for n, r in before.items() if n in records} or stale:
        with led.edit():
            led.data["decisions"] = records
    return records, said


def describe(event: dict[str, Any]) -> str:
    """One line: `gate on ft: accuracy >= 0.8: 0.61 >= 0.8 is false; retry as ft@2`."""
    if event["kind"] == "select":
        shown = ", ".join(f"{n} {_num(v)}" for n, v in event["values"].items())
        return f"variants by {event['goal']} {event['metric']}: {shown}; chosen {event['chosen']}"
    parts = [f"{c['condition']}: " + (c["problem"] if c.get("problem") else
             f"{_num(c['left'])} {c['compare']} {_num(c['right'])} is {'true' if c['passed'] else 'FALSE'}")
             for c in event["checks"]]
    then = {"pass": "passed", "retry": f"failed; retry as {event.get('next')}", "fallback": "failed; fallback",
            "stop": "failed; the run stops"}[event["action"]]
    return f"gate on {event['attempt']}: {'; '.join(parts)} -> {then}"


def fail_text(name: str, event: dict[str, Any]) -> str:
    """Why a gate stopped the run: each failed condition with its metric's value and the threshold."""
    failed = [c for c in event["checks"] if not c["passed"]]
    shown = "; ".join(c["problem"] if c.get("problem") else f"{c['condition']} is false: {_num(c['left'])} "
                      f"against {_num(c['right'])}" for c in failed)
    return f"stage {name} failed its gate on {event['attempt']}: {shown}"


def stopped_text(record: dict[str, Any], *, replayed: bool = False) -> str:
    """What `baton run` / `submit` say when a gate's stop ends the run (exit 3); `replayed`: decided by an earlier
    run, nothing ran now."""
    return f"{record['reason']}; " + ("the run stopped there (replayed decision)" if replayed else
                                      f"the run stops here: the stages after it did not run (exit {EXIT_GATE_STOPPED})")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

