"""The leaderboard page's inline script (sorting and the self-check) run by node against a minimal DOM built from
the page's own table cells: checked where Chromium is missing (tests/test_leaderboard_browser.py loads the real page
in headless Chromium). Skipped where no ``node`` binary is installed."""

import shutil

import pytest

NODE_DOM = r"""
const fs = require("fs");
const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const handlers = {};
function el(attrs, text) {
  return {attrs: attrs || {}, textContent: text || "",
          getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; },
          setAttribute(k, v) { this.attrs[k] = String(v); }, addEventListener() {}};
}
const tables = spec.tables.map(t => {
  const body = {rows: []};
  body.appendChild = r => { body.rows.splice(body.rows.indexOf(r), 1); body.rows.push(r); };
  body.rows = t.rows.map(r => ({cells: r.map(c => el(c.sort === null ? {} : {"data-sort": c.sort}, c.text))}));
  const table = el({}, "");
  table.id = t.id;
  table.tHead = {rows: [{cells: t.keys.map(k => el({"data-key": k}, k))}]};
  table.tBodies = [body];
  return table;
});
const check = el({}, "");
global.window = {addEventListener(k, f) { (handlers[k] = handlers[k] || []).push(f); }};
global.document = {
  addEventListener() {}, images: [], getElementById() { return check; },
  querySelectorAll(q) { return q === "table.board" ? tables : spec.sections.map(s => ({id: s})); },
  body: {getAttribute() { return spec.sections.join(" "); }, scrollHeight: 100},
  documentElement: {scrollHeight: 100},
};
eval(spec.script);
(handlers.load || []).forEach(f => f());
process.stdout.write(check.textContent);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="no node binary (the script check runs it with node)")
def test_leaderboard_sort_script_runs_in_node(tmp_path, synth_root):
    """Where Chromium is missing: the page's own script, run by node against a minimal DOM built from the page's
    table cells, sorts by mAP both ways and back by rank without an error."""
    import json
    import re
    import subprocess
    from html import unescape

    from tests.test_robust import fake_results

    from advreid.reporting.leaderboard import write_leaderboard

    paths, _ = write_leaderboard(fake_results(tmp_path, [0.31, 0.12, 0.5]), tmp_path / "board")
    page = paths[0].read_text()
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    tables = []
    for tid, thead, tbody in re.findall(r'<table class="board" id="([^"]+)">\s*<thead>(.*?)</thead>\s*<tbody>(.*?)'
                                        r"</tbody>", page, re.S):
        keys = re.findall(r'data-key="([^"]+)"', thead)
        rows = [[{"sort": None if m[0] == "" else unescape(m[1]), "text": unescape(re.sub("<[^>]+>", "", m[2]))}
                 for m in re.findall(r'<td class="[^"]*"( data-sort="([^"]*)")?>(.*?)</td>', tr)]
                for tr in re.findall(r"<tr>(.*?)</tr>", tbody, re.S)]
        tables.append({"id": tid, "keys": keys, "rows": rows})
    sections = re.findall(r'<section id="([^"]+)"', page)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"script": script, "tables": tables, "sections": sections}))
    js = tmp_path / "dom.js"
    js.write_text(NODE_DOM)
    out = json.loads(subprocess.run(["node", str(js), str(spec)], capture_output=True, text=True, check=True,
                                    timeout=60).stdout)
    assert out["errors"] == [] and out["sections"] == ["group-1"]
    (s,) = out["sorts"]
    assert s["rows"] == 3 and s["map_ascending"] == [0.12, 0.31, 0.5] and s["map_descending"] == [0.5, 0.31, 0.12]
    assert s["ranks"] == [1, 2, 3] and s["map_by_rank"] == [0.5, 0.31, 0.12]
