"""The `nmt` console script's utility subcommands."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, TINY_PROFILE
from nmt.cli import main


def test_params_prints_dotted_keys(capsys) -> None:
    assert main(["params", "--params", str(REPO / "params.yaml"),
                 "--profile", str(TINY_PROFILE)]) == 0
    out = capsys.readouterr().out
    assert "model.hidden = 16" in out and "evaluate.search.beam_size = 2" in out


def test_params_error_names_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("seed: 1234", "seed: abc"))
    assert main(["params", "--params", str(bad)]) == 1
    assert "seed: expected int" in capsys.readouterr().err


def test_stats(tiny_data: dict[str, Path], capsys) -> None:
    assert main(["stats", "--stats", str(tiny_data["reports"] / "vectorize/stats.json")]) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["stats", "--stats", str(tiny_data["reports"] / "missing.json")]) == 1


def test_translate_rejects_a_beam_outside_the_range_before_loading(tmp_path: Path,
                                                                   capsys) -> None:
    missing = tmp_path / "no-model"  # nothing is loaded: the flag is checked first
    for flags, message in ((["--beam", "100"], "--beam: must be in [1, 64], got 100"),
                           (["--beam", "0"], "--beam: must be in [1, 64], got 0"),
                           (["--beam", "3", "--nbest", "4"],
                            "--nbest: must be in [1, beam_size=3], got 4")):
        assert main(["translate", "--model", str(missing), *flags, "Hi."]) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"error: {message}"
