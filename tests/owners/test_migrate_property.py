"""Property: whatever the layout of a service, migrate's edit compiles, every chosen mode
reads back, other RPCs keep theirs, and every comment survives byte for byte."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owners import migrate
from policy import Mode

MODES = [m for m in Mode if m is not Mode.UNSPECIFIED]
INDENTS = ["  ", "    ", "\t", " "]
SHAPES = ["semicolon", "empty_inline", "empty_block", "other_option", "has_mode", "inline_option"]


@st.composite
def services(draw):
    indent = draw(st.sampled_from(INDENTS))
    n = draw(st.integers(1, 5))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
    import_options = draw(st.booleans()) or "has_mode" in shapes or "inline_option" in shapes
    choices = {f"Rpc{i}": draw(st.sampled_from(MODES)) for i in range(n) if draw(st.booleans())}
    lines = ['syntax = "proto3";', "// file comment", "package prop.v1;", ""]
    if import_options:
        lines.append('import "rpcauthz/v1/options.proto";')
    lines += ['import "google/protobuf/empty.proto";', "", "message M { string a = 1; }", "",
              "/* block", "   comment */", "service Prop {"]
    sig = "(M) returns (M)"
    for i, shape in enumerate(shapes):
        name = f"Rpc{i}"
        lines.append(f"{indent}// about {name}")
        if shape == "semicolon":
            lines.append(f"{indent}rpc {name}{sig}; // trailing {i}")
        elif shape == "empty_inline":
            lines.append(f"{indent}rpc {name}{sig} {{}}")
        elif shape == "empty_block":
            lines += [f"{indent}rpc {name}{sig} {{", f"{indent}}}"]
        elif shape == "other_option":
            lines += [f"{indent}rpc {name}{sig} {{", f"{indent}{indent}option deprecated = true; // dep {i}",
                      f"{indent}}}"]
        elif shape == "has_mode":
            lines += [f"{indent}rpc {name}{sig} {{",
                      f"{indent}{indent}option (rpcauthz.v1.humans_who_can_rpc) = ENGINEERS_WITH_APPROVAL;",
                      f"{indent}}}"]
        else:
            lines.append(f"{indent}rpc {name}{sig} {{ option (rpcauthz.v1.humans_who_can_rpc) = BREAK_GLASS_ONLY; }}")
    lines += ["}", ""]
    return "\n".join(lines), choices


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services())
def test_any_layout_edits_cleanly(case):
    text, choices = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f = root / "prop/v1/prop.proto"
        f.parent.mkdir(parents=True)
        f.write_text(text)
        found = migrate.find_service("prop.v1.Prop", root)
        before = {r.method: r.method_mode for r in found.rpcs}
        old, new = migrate.finish(found, choices)   # compiles and checks read-back, then writes
        assert f.read_text() == new
        after = {r.method: r.method_mode
                 for r in migrate.find_service("prop.v1.Prop", root).rpcs}
        assert after == {m: choices.get(m, before[m]) for m in before}
        for line in old.splitlines():
            if "//" in line or "/*" in line or "*/" in line:
                comment = line[line.index("//"):] if "//" in line else line.strip()
                assert comment in new
        had_import = 'import "rpcauthz/v1/options.proto";' in old
        assert new.count('import "rpcauthz/v1/options.proto";') == (1 if had_import or new != old else 0)
