"""`baton lineage` as text, JSON, Mermaid and a picture, on run folders made without training.

tests/data/gates-ledger.json is the ledger of a real `baton run` of `gates_manifest` (tests/conftest.py): a retry
(pretrain -> pretrain@2), two variants (finetune@v1 chosen), a failed gate with a fallback (prune -> finetune's
chosen variant goes on to last) and a shared eval set; trimmed of settings and commands, its folder written as
$ROOT. The tests give each done stage a final/ whose sizes and mtimes the ledger records, as a run leaves it.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from contract.files import short
from launcher import lineage
from launcher.cli import main
from launcher.digests import folder_stat
from tests.conftest import ROOT

FIXTURE = Path(__file__).parent / "data" / "gates-ledger.json"
SVG = "{http://www.w3.org/2000/svg}"
ODD = 'fine "tune" [a] {b} <c> #1 | d & `e`'  # a stage name with every character Mermaid or HTML would misread


def rename(obj: Any, old: str, new: str) -> Any:
    """`obj` with `old` replaced by `new` in every key and string."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {rename(k, old, new): rename(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rename(v, old, new) for v in obj]
    return obj


def make_run(root: Path, *renames: tuple[str, str]) -> Path:
    """A run folder holding the fixture's ledger (with `renames` applied) and a final/ for each done stage."""
    data = json.loads(FIXTURE.read_text().replace("$ROOT", str(root)))
    for old, new in renames:
        data = rename(data, old, new)
    for name, entry in data["stages"].items():
        if entry.get("output"):
            final = Path(entry["output"]["path"])
            final.mkdir(parents=True)
            (final / "model.safetensors").write_text(name)
            entry["output"]["stat"] = folder_stat(final)
    run_dir = root / "run"
    (run_dir / "ledger.json").write_text(json.dumps(data, indent=2))
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def ledger(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "ledger.json").read_text())


def test_the_graph_has_every_stage_input_and_decision_and_survives_json(run_dir: Path) -> None:
    g = lineage.graph(run_dir)
    assert g["version"] == 1 and json.loads(json.dumps(g, allow_nan=False)) == g
    led = ledger(run_dir)
    assert [n["name"] for n in g["nodes"]] == list(led["stages"])
    ids = {n["id"] for n in g["nodes"]} | {s["id"] for s in g["sources"]}
    assert len(ids) == len(g["nodes"]) + len(g["sources"])
    assert all(e["from"] in ids and e["to"] in ids for e in g["edges"])
    assert all(list(e) == ["from", "to", "key", "digest", "state", "now", "named", "handed_on"] for e in g["edges"])
    for name, entry in led["stages"].items():  # one edge per reference and data file, in the ledger's order
        mine = [(e["key"], e["digest"]) for e in g["edges"] if e["to"] == f"stage:{name}"]
        expected = [(k, r.get("digest")) for k, v in entry["inputs"].items() if k != "data" for r in lineage.refs(v)]
        assert mine == expected + [("data", d) for d in entry["inputs"]["data"].values()], name
    nodes = {n["name"]: n for n in g["nodes"]}
    chosen = led["decisions"]["finetune"]["events"][0]["chosen"]
    assert nodes["pretrain@2"] | {"output": None} == {
        "id": "stage:pretrain@2", "name": "pretrain@2", "kind": "mlm", "state": "done", "stage": "pretrain",
        "role": "retry", "output": None, "on_disk": "ok", "gate": "passed"}
    assert nodes["pretrain@2"]["output"] == {k: led["stages"]["pretrain@2"]["output"][k] for k in ("path", "digest")}
    assert {n: nodes[n]["gate"] for n in ("tokenizer", "pretrain", "finetune@v1", "finetune@v2", "prune", "last")} \
        == {"tokenizer": None, "pretrain": "failed", "prune": "failed", "last": "passed", chosen: "selected",
            ({"finetune@v1", "finetune@v2"} - {chosen}).pop(): "not selected"}
    assert nodes["finetune@v2"]["role"] == "variant" and nodes["finetune@v2"]["stage"] == "finetune"
    handed = {(e["from"], e["to"], e["key"]): (e["named"], e["handed_on"]) for e in g["edges"] if e.get("named")}
    assert handed[("stage:pretrain@2", "stage:finetune@v1", "init")] == ("pretrain", "passed")
    assert handed[(f"stage:{chosen}", "stage:prune", "init")] == ("finetune", "selected")
    assert handed[(f"stage:{chosen}", "stage:last", "tokenizer")] == ("prune", "fallback")
    assert {e["state"] for e in g["edges"]} == {"ok"}
    decisions = {d["stage"]: d for d in g["decisions"]}
    assert list(decisions) == ["pretrain", "finetune", "prune", "last"]
    assert [(d["outcome"], d["hand_on"], d["fallback"]) for d in decisions.values()] == [
        ("pass", "pretrain@2", None), ("pass", chosen, None), ("fallback", chosen, "finetune"), ("pass", "last", None)]
    assert decisions["pretrain"]["events"][0]["text"].endswith("-> failed; retry as pretrain@2")
    assert decisions["prune"]["events"][0]["text"].endswith("-> failed; fallback")
    # sources: each data file once, though many stages read it; the configs pretrain and its retry were built from
    sources = {s["id"]: s for s in g["sources"]}
    assert sorted(s["path"] for s in sources.values() if s["type"] == "data") == sorted(
        {p for e in led["stages"].values() for p in e["inputs"]["data"]})
    assert sorted(s["path"] for s in sources.values() if s["type"] == "config") == ["pretrain/init", "pretrain@2/init"]
    assert g["run"] | {"dir": None} == {"name": "gates", "dir": None, "manifest": led["manifest"],
                                        "manifest_digest": led["manifest_digest"], "evals": ["heldout"]}


def test_the_text_keeps_its_lines(run_dir: Path) -> None:
    text = lineage.text(lineage.graph(run_dir))
    lines = text.splitlines()
    assert lines[0].startswith("run gates  manifest ") and lines[1] == "tokenizer [tokenizer] done"
    assert "pretrain@2 [mlm] done" in lines and "  <- init built from a config" in lines
    led = ledger(run_dir)
    chosen = led["decisions"]["finetune"]["events"][0]["chosen"]
    digest = short(led["stages"][chosen]["output"]["digest"])
    assert f"  <- init {chosen}/final  {digest}  (ok; handed on for prune)" in lines
    assert f"  <- init {chosen}/final  {digest}  (ok; handed on for finetune)" in lines
    assert "  <- init pretrain@2/final" in text and text.count("(ok") == 10
    assert any(line.startswith("  decided: gate on pretrain: eval_loss <= 6.2") for line in lines)
    # the variants' selection is told under the last variant (no instance has the stage's own name)
    after = lines[lines.index("finetune@v2 [classify] done"):lines.index("prune [prune] done")]
    assert after[-1].startswith("  decided: variants by min eval_loss: finetune@v1 ")

    final = Path(led["stages"][chosen]["output"]["path"]) / "model.safetensors"
    final.write_text("changed")  # another size: changed on disk, as status and lineage tell without hashing
    text = lineage.text(lineage.graph(run_dir))
    assert f"  -> {final.parent}  {digest}  (CHANGED ON DISK)" in text
    assert f"  <- init {chosen}/final  {digest}  (CHANGED ON DISK; handed on for prune)" in text

    led["stages"][chosen]["output"]["digest"] = "sha256:" + "ab" * 32  # the stage ran again since
    (run_dir / "ledger.json").write_text(json.dumps(led))
    g = lineage.graph(run_dir)
    assert f"  <- init {chosen}/final  {digest}  (STALE: {chosen} now gives abababababab; handed on for prune)" \
        in lineage.text(g)
    assert "init, tokenizer " + digest + " STALE" in lineage.mermaid(g)


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
    """({node id: its label, unescaped}, [(from, arrow, label, to)]), asserting every line is well-formed."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes: dict[str, str] = {}
    edges = []
    label = r'"([^"\[\]{}<>|`]*(?:<br/>[^"\[\]{}<>|`]*)*)"'  # quoted; nothing unescaped but the line breaks
    for line in lines[1:]:
        if m := re.fullmatch(rf'  ([ns]\d+)(?:\[{label}\]|\[\({label}\)\]|\[\[{label}\]\]|\{{\{{{label}\}}\}}):::(\w+)',
                             line):
            assert m.group(1) not in nodes, f"defined twice: {line}"
            shown = next(g for g in m.groups()[1:5] if g is not None)
            nodes[m.group(1)] = re.sub(r"#(\d+);", lambda c: chr(int(c.group(1))), shown.replace("<br/>", "\n"))
        elif m := re.fullmatch(rf"  ([ns]\d+) (-->|-\.->|==>)\|{label}\| ([ns]\d+)", line):
            unescaped = re.sub(r"#(\d+);", lambda c: chr(int(c.group(1))), m.group(3))
            edges.append((m.group(1), m.group(2), unescaped, m.group(4)))
        else:
            assert re.fullmatch(r"  (classDef \w+ [\w:#,-]+|style n\d+ [\w:-]+|linkStyle \d+ [\w:#]+)", line), line
    assert all(a in nodes and b in nodes for a, _, _, b in edges)
    return nodes, edges


def test_mermaid_is_well_formed_with_awkward_names_and_paths(tmp_path: Path) -> None:
    data = 'my data/it\'s "train" [1].jsonl'
    run_dir = make_run(tmp_path, ("finetune", ODD), ("data/train.jsonl", data))
    g = lineage.graph(run_dir)
    nodes, edges = parse_mermaid(lineage.mermaid(g))
    assert len(nodes) == len(g["nodes"]) + len(g["sources"])
    by_label = {label.split("\n")[0]: node for node, label in nodes.items()}
    for stage in (f"{ODD}@v1", f"{ODD}@v2", "pretrain@2", "last"):
        assert stage in by_label, stage
    assert f"{tmp_path}/{data}" in by_label
    arrows = {(a, b): (arrow, label) for a, arrow, label, b in edges}
    chosen = ledger(run_dir)["decisions"][ODD]["events"][0]["chosen"]
    assert arrows[(by_label[chosen], by_label["prune"])][0] == "==>"
    assert arrows[(by_label[chosen], by_label["prune"])][1].endswith(f"· selected for {ODD}")
    assert arrows[(by_label[chosen], by_label["last"])][0] == "-.->"
    assert arrows[(by_label[chosen], by_label["last"])][1].endswith("· fallback for prune")
    assert arrows[(by_label["pretrain"], by_label["pretrain@2"])] == ("-.->", "retry")
    assert arrows[(by_label["tokenizer"], by_label["pretrain"])][1] == \
        "tokenizer " + short(ledger(run_dir)["stages"]["tokenizer"]["output"]["digest"])
    assert "gate failed" in nodes[by_label["prune"]] and "selected" in nodes[by_label[chosen]]


def test_the_picture_is_svg_with_a_box_per_stage_and_every_digest(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, ("finetune", ODD))
    text = lineage.svg(run_dir)
    assert text.startswith("<svg")
    root = ET.fromstring(text)
    g = lineage.graph(run_dir)
    for i, node in enumerate(g["nodes"]):
        group = next(e for e in root.iter(f"{SVG}g") if e.get("id") == f"stage-{i}")
        assert group.find(f".//{SVG}path") is not None  # its box
        assert [t.text for t in group.iter(f"{SVG}text")][:2] == [node["name"], f"{node['kind']} · done"]
    shown = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    for edge in g["edges"]:
        assert short(edge["digest"]) in shown or edge["digest"] is None, edge
    assert f"selected for {ODD}" in shown and "fallback for prune" in shown and "retry" in shown
    assert "gate failed" in shown and "not selected" in shown


def test_the_picture_as_png(run_dir: Path) -> None:
    png = lineage.picture(lineage.graph(run_dir), "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert 800 < width < 4000 and 300 < height < 2000, (width, height)


def test_fifteen_stages_stay_one_box_each(tmp_path: Path) -> None:
    """A long chain with variants: every stage drawn once, the picture wide but not absurd."""
    stages: dict[str, Any] = {}
    before = None
    for k in range(15):
        for name in ([f"s{k}@v1", f"s{k}@v2", f"s{k}@v3"] if k % 5 == 2 else [f"s{k}"]):
            ref = {"init": {"source": "stage", "stage": before, "path": None, "digest": f"sha256:{k:064x}"}} \
                if before else {}
            stages[name] = {"state": "done" if k < 12 else "pending", "attempts": [], "kind": "classify",
                            "inputs": ref | {"data": {f"/d/{k % 3}.jsonl": f"sha256:{k % 3:064x}"}},
                            "output": {"path": f"/x/{name}", "digest": f"sha256:{k + 1:064x}"} if k < 12 else None}
        before = name
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.json").write_text(json.dumps({"version": 1, "stages": stages, "run": "long"}))
    g = lineage.graph(run_dir)
    root = ET.fromstring(lineage.svg(run_dir))
    names = [t.text for t in root.iter(f"{SVG}text")]
    assert all(names.count(n) == 1 for n in stages)
    assert float(root.get("width", "0").removesuffix("pt")) < 72 * 2.7 * 17
    assert len(parse_mermaid(lineage.mermaid(g))[0]) == len(stages) + 3


def test_the_command_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def baton(*args: object) -> tuple[int, str, str]:  # the CLI in this process: no interpreter start per call
        code = main(["lineage", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    g = json.loads(baton(run_dir, "--json")[1])
    assert g == json.loads(baton(run_dir, "--format", "json")[1])
    assert [n["name"] for n in g["nodes"]] == list(ledger(run_dir)["stages"])
    assert baton(run_dir)[1] == lineage.text(lineage.graph(run_dir)) + "\n"
    assert baton(run_dir, "--format", "mermaid")[1].startswith("flowchart LR\n")
    ET.fromstring(baton(run_dir, "--format", "svg")[1])

    code, out, err = baton(run_dir, "--format", "png")
    assert code == 2 and out == "" and "give -o FILE.png" in err
    png = tmp_path / "lineage.png"
    assert baton(run_dir, "--format", "png", "-o", png)[:2] == (0, "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".lineage.png.tmp-*"))
    baton(run_dir, "--format", "mermaid", "-o", tmp_path / "lineage.mmd")
    assert (tmp_path / "lineage.mmd").read_text() == lineage.mermaid(lineage.graph(run_dir))

    for where in (tmp_path / "nothing", tmp_path):  # no folder; a folder with no ledger
        code, out, err = baton(where, "--json")
        assert code == 2 and "is this a run folder" in err and out == ""
    code, _, err = baton(run_dir, "-o", tmp_path / "no" / "such" / "x.txt")
    assert code == 2 and "cannot write" in err


def test_lineage_reads_no_training_library_and_draws_only_when_asked(run_dir: Path) -> None:
    code = ("import sys; from pathlib import Path; from launcher import lineage; "
            f"lineage.text(lineage.graph(Path({str(run_dir)!r}))); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'networkx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_box_hides_an_arrow(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arrow of the picture (inputs, data lines, retries) is routed around the boxes it would pass behind: a
    straight line from a source to its second reader crosses the first reader's box, so the arrow bends."""
    routes: list[tuple[Any, Any, list[Any], float]] = []
    bend = lineage._bend

    def recorded(start: Any, end: Any, others: list[Any]) -> float:
        routes.append((start, end, others, chosen := bend(start, end, others)))
        return chosen

    monkeypatch.setattr(lineage, "_bend", recorded)
    lineage.picture(lineage.graph(run_dir), "svg")

    def crossed(start: Any, end: Any, others: list[Any], b: float) -> list[Any]:
        points = [lineage._curve(start, end, b, k / 100) for k in range(2, 99)]
        return [box for box in others if any(box[0][0] < x < box[1][0] and box[0][1] < y < box[1][1]
                                             for x, y in points)]

    assert len(routes) >= len(lineage.graph(run_dir)["edges"]) // 2
    assert not [r for r in routes if crossed(*r)], [r[:2] for r in routes if crossed(*r)]
    straight_hidden = [r for r in routes if abs(r[0][0] - r[1][0]) > 1e-6 and crossed(r[0], r[1], r[2], 0.0)]
    assert straight_hidden and all(r[3] != 0 for r in straight_hidden)
