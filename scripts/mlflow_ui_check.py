"""Look at a sweep in the real MLflow UI, as a user would: start ``mlflow server`` on loopback over a tracking
store, open the sweep's comparison view (``pipelines.tracking.mlflow_ui_url``) in headless Chromium, save a
screenshot and the rendered DOM, and check that the page is the runs table (not the GenAI overview) listing
the sweep's trial runs flat, by name, with their strategy and size, best final metric first (each trial's task's ``val_<metric>``, in its direction).

    python scripts/mlflow_ui_check.py --mlflow-uri sqlite:///$PWD/mlruns.db --sweep ci --out ui_check

Writes ``OUT/mlflow_runs.png``, ``OUT/mlflow_runs.html`` (``--dump-dom``), ``OUT/mlflow_ui_check.json`` (the
URL, the rows read from the DOM, each check) and ``OUT/mlflow-server.log``; exit code 0 when every check
passes, 1 when one fails, 2 on a usage error (no Chromium: ``apt-get install -y chromium``). An http(s)
``--mlflow-uri`` is a running server: it is used as it is. Each browser run gets a fresh profile, so what
the page shows is what a first visit shows (no UI state saved by an earlier visit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # tests/mlflow_machinery.py starts and stops the loopback server
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
         "--hide-scrollbars"]


class UsageError(Exception):
    pass


# ------------------------------------------------------------------------------------------ the DOM


class _Dom(HTMLParser):
    """The parts of a dumped runs page we check: the title, the visible text, and the grid's rows (ag-grid
    renders a row once per pinned/scrolling section, each with ``row-id`` = the run id; cells carry
    ``col-id``)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.text: list[str] = []
        self.rows: dict[str, dict[str, str]] = {}
        self.row_order: list[str] = []
        self._stack: list[tuple[str, str | None, str | None]] = []  # (tag, row id, col id) per open element
        self._skip = 0
        self._in_title = False

    def _current(self) -> tuple[str | None, str | None]:
        row = col = None
        for _, r, c in self._stack:
            row, col = r or row, c or col
        return row, col

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        if tag == "title":
            self._in_title = True
        row = a.get("row-id") if a.get("role") == "row" else None
        if row and row not in self.rows:
            self.rows[row] = {}
            self.row_order.append((int(a.get("row-index", len(self.row_order))), row))
        if tag not in self.VOID:
            self._stack.append((tag, row, a.get("col-id") if a.get("role") == "gridcell" else None))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if tag == "title":
            self._in_title = False
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._skip or not data.strip():
            return
        if self._in_title and not self.title:
            self.title = data.strip()
        self.text.append(data.strip())
        row, col = self._current()
        if row and col:
            cell = self.rows[row]
            cell[col] = (cell.get(col, "") + " " + data.strip()).strip()

    def ordered_rows(self) -> list[tuple[str, dict[str, str]]]:
        return [(rid, self.rows[rid]) for _, rid in sorted(self.row_order)]


def parse_dom(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


# ------------------------------------------------------------------------------------------ the browser


def find_browser(name: str | None = None) -> str:
    for candidate in ([name] if name else BROWSERS):
        path = shutil.which(candidate)
        if path:
            return path
    raise UsageError("no Chromium found; install it with `apt-get install -y chromium` (Debian) or pass --browser")


def browse(browser: str, url: str, *, screenshot: Path | None = None, window: str = "1800,1100",
           budget_ms: int = 25000, timeout: float = 120.0) -> str:
    """One headless Chromium run on a fresh profile: a screenshot to ``screenshot``, or the rendered DOM
    (returned). The single-page app needs the virtual-time budget to fetch and render before the dump."""
    with tempfile.TemporaryDirectory(prefix="weit-ui-profile-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
               f"--virtual-time-budget={budget_ms}"]
        cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or (screenshot and not screenshot.exists()):
        raise RuntimeError(f"{Path(browser).name} exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return proc.stdout


# ------------------------------------------------------------------------------------------ what MLflow holds


def expected_trials(uri: str, experiment: str, sweep: str | None) -> dict:
    """The sweep's parent run and trial runs as MLflow has them (what the page must show)."""
    import mlflow

    from pipelines.report import find_parent

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UsageError(f"no experiment {experiment!r} in {uri}")
    if sweep is None:
        runs = client.search_runs([exp.experiment_id], "tags.`weit.kind` = 'sweep'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            raise UsageError(f"no sweep in experiment {experiment!r} at {uri}; pass --sweep")
        sweep = runs[0].data.tags["weit.sweep"]
    try:
        parent = find_parent(client, sweep, experiment=experiment)
    except Exception as e:  # UserError: no such sweep
        raise UsageError(str(e)) from e
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=50000)
    trials = {}
    for r in children:
        metric = r.data.tags.get("weit.metric", "val_acc")
        trials[r.info.run_id] = {"name": r.info.run_name, "strategy": r.data.tags.get("weit.strategy"),
                                 "size": r.data.tags.get("weit.size"), "metric": metric,
                                 "mode": r.data.tags.get("weit.mode", "max"), "value": r.data.metrics.get(metric)}
    return {"experiment_id": exp.experiment_id, "experiment_tags": dict(exp.tags), "sweep": sweep,
            "parent_run_id": parent.info.run_id, "parent_name": parent.info.run_name, "trials": trials}


# ------------------------------------------------------------------------------------------ the checks


def check_page(dom: _Dom, expected: dict) -> list[dict]:
    """Each check as ``{name, ok, detail}``: the runs page (not an overview), every rendered row one of the
    sweep's trials (the parent row absent: the trials are listed flat), names, strategies and sizes as
    MLflow has them, best metric first, and all the trials rendered (or as many as the grid shows)."""
    trials = expected["trials"]
    rows = dom.ordered_rows()
    text = " ".join(dom.text)
    checks = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    check("runs page, not the GenAI overview", dom.title.startswith("Runs") and "Overview" not in dom.title,
          f"title {dom.title!r}")
    check("runs table rendered", len(rows) > 0, f"{len(rows)} grid rows")
    check("parent row absent (trials listed flat)", expected["parent_run_id"] not in dom.rows
          and (expected["parent_name"] or "\0") not in text, expected["parent_name"] or "")
    strangers = [rid for rid, _ in rows if rid not in trials]
    check("every row is a trial of this sweep", not strangers, f"{len(strangers)} other rows")
    want = min(len(trials), 20)  # a grid renders the rows in view (and a few more); 20 fit at 1100 px
    check("the trials are rendered", len(rows) >= want, f"{len(rows)} rows of {len(trials)} trials")
    bad = []
    for rid, cells in rows:
        t = trials.get(rid)
        if t is None:
            continue
        for col, key in (("attributes.`Run Name`", "name"), ("tags.`weit.strategy`", "strategy"),
                         ("tags.`weit.size`", "size")):
            shown = cells.get(col, "")
            if (t[key] not in shown.split()) if key == "name" else shown != t[key]:  # name: after its colour
                bad.append(f"{rid[:8]} {col}: page {cells.get(col)!r}, MLflow {t[key]!r}")
    check("run names, strategies and sizes shown as logged", not bad and rows, "; ".join(bad[:5]))
    shown = [trials[rid] for rid, _ in rows if rid in trials]
    metric, lower = (shown[0]["metric"], shown[0]["mode"] == "min") if shown else ("val_acc", False)
    values = [t["value"] if t["value"] is not None else float("inf" if lower else "-inf") for t in shown]
    check(f"sorted by final {metric}, best first", values == sorted(values, reverse=not lower),
          ", ".join(f"{v:.4f}" for v in values[:8]))
    names = sorted({t["strategy"] for t in trials.values()})
    check("every strategy of the sweep visible", all(n in text for n in names), ", ".join(names))
    check("the experiment is tagged as training runs",
          expected["experiment_tags"].get("mlflow.experimentKind") == "custom_model_development",
          str(expected["experiment_tags"].get("mlflow.experimentKind")))
    return checks


# ------------------------------------------------------------------------------------------ main


def run_check(uri: str, out: Path, *, sweep: str | None = None, experiment: str = "weit-sweep",
              browser: str | None = None, window: str = "1800,1100", budget_ms: int = 25000) -> dict:
    from mlflow_machinery import start_mlflow_server

    from pipelines.tracking import mlflow_ui_url, tracking_uri

    uri = tracking_uri(uri)
    out.mkdir(parents=True, exist_ok=True)
    exe = find_browser(browser)
    expected = expected_trials(uri, experiment, sweep)
    server = None
    if uri.startswith(("http://", "https://")):
        base = uri
    else:
        server = start_mlflow_server(uri, workers=1, log=out / "mlflow-server.log")
        base = server.uri
    try:
        url = mlflow_ui_url(base, expected["experiment_id"], expected["sweep"])
        t0 = time.perf_counter()
        png = out / "mlflow_runs.png"
        png.unlink(missing_ok=True)
        browse(exe, url, screenshot=png, window=window, budget_ms=budget_ms)
        html = browse(exe, url, window=window, budget_ms=budget_ms)
        dom = parse_dom(html)
        if not dom.rows:  # a slow first render: once more with a longer budget
            html = browse(exe, url, window=window, budget_ms=2 * budget_ms)
            dom = parse_dom(html)
        browse_s = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
    (out / "mlflow_runs.html").write_text(html)
    checks = check_page(dom, expected)
    result = {"url": url, "title": dom.title, "sweep": expected["sweep"], "experiment_id": expected["experiment_id"],
              "n_trials": len(expected["trials"]), "screenshot": str(png), "dom": str(out / "mlflow_runs.html"),
              "browse_s": round(browse_s, 1), "ok": all(c["ok"] for c in checks), "checks": checks,
              "rows": [{"run_id": rid, **cells} for rid, cells in dom.ordered_rows()]}
    (out / "mlflow_ui_check.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/mlflow_ui_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlflow-uri", default=None, help="tracking store: sqlite URI or file (default: as weit "
                    "resolves it, ./mlruns.db), or the http(s) address of a running server")
    ap.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep in the experiment)")
    ap.add_argument("--experiment", default="weit-sweep")
    ap.add_argument("--out", default="ui_check", help="folder for the screenshot, the DOM and the summary")
    ap.add_argument("--browser", default=None, help=f"browser executable (default: the first of {BROWSERS})")
    ap.add_argument("--window", default="1800,1100", help="browser window WIDTH,HEIGHT in pixels")
    ap.add_argument("--budget-ms", type=int, default=25000, help="Chromium's virtual-time budget per page")
    a = ap.parse_args(argv)
    try:
        r = run_check(a.mlflow_uri, Path(a.out), sweep=a.sweep, experiment=a.experiment, browser=a.browser,
                      window=a.window, budget_ms=a.budget_ms)
    except UsageError as e:
        print(f"[mlflow ui check] {e}", file=sys.stderr)
        return 2
    print(f"[mlflow ui check] {r['url']}\n  title {r['title']!r}; {len(r['rows'])} rows shown of {r['n_trials']} "
          f"trials; browser {r['browse_s']} s")
    for c in r["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}" + (f" ({c['detail']})" if c["detail"] else ""))
    print(f"  screenshot {r['screenshot']}\n  DOM {r['dom']}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
