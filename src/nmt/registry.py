"""MLflow model registry: versions, the `candidate`/`champion` aliases, the promotion gate and
the rollback of a half-finished registration.

Runs, params and artifacts go through `nmt.tracking`; registered models go through this module.
The champion's BLEU is its version's `test_bleu` tag; a version's `content_sha256` tag identifies
the served content (`nmt.export.pyfunc.content_sha256`), so an identical model is never
registered twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow import MlflowClient

log = logging.getLogger(__name__)

ALIAS_CANDIDATE, ALIAS_CHAMPION = "candidate", "champion"
DESCRIPTION = "English->French attention seq2seq (nmt); data CC-BY 2.0 Tatoeba/manythings.org"


class RegistryError(RuntimeError):
    """The registry is in a state the promotion gate cannot use (e.g. an untagged champion)."""


@dataclass(frozen=True)
class Promotion:
    """Outcome of the promotion gate (written to reports/export/promotion.json)."""

    registered_model: str
    version: str
    model_uri: str
    test_bleu: float
    champion_version_before: str | None
    champion_bleu_before: float | None
    promotion_margin: float
    decision: str  # "promoted" | "kept" | "unchanged" (identical model already registered)
    reason: str
    champion_version: str | None


def client(tracking_uri: str) -> MlflowClient:
    """A registry client for the store at `tracking_uri`."""
    return MlflowClient(tracking_uri)


def decide_promotion(new_bleu: float, champion_bleu: float | None, margin: float
                     ) -> tuple[bool, str]:
    """(promote?, reason): promote when there is no champion or new - champion >= margin."""
    if champion_bleu is None:
        return True, "no champion yet"
    gain = round(new_bleu - champion_bleu, 6)  # BLEU is rounded to 4 decimals upstream
    if gain >= margin:
        return True, f"test/bleu {new_bleu:.4f} beats the champion's {champion_bleu:.4f} " \
                     f"by {gain:.4f} >= margin {margin}"
    return False, f"test/bleu {new_bleu:.4f} vs champion {champion_bleu:.4f}: gain {gain:.4f} " \
                  f"< margin {margin}"


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """Version `alias` points to, None when the alias or the registered model does not exist."""
    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except Exception:  # noqa: BLE001 - no such registered model
        return None
    return None if version is None else str(version)  # the SQL store returns ints


def _champion_bleu(client: MlflowClient, name: str, version: str | None) -> float | None:
    if version is None:
        return None
    tag = client.get_model_version(name, version).tags.get("test_bleu")
    if tag is None:
        raise RegistryError(f"{name} version {version} (champion) has no test_bleu tag; tag it "
                            "(or move the alias) before exporting")
    return float(tag)


def find_registered(client: MlflowClient, name: str, content_sha: str) -> str | None:
    """Newest version of `name` whose `content_sha256` tag matches, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no such registered model
        return None
    same = [int(v.version) for v in versions if v.tags.get("content_sha256") == content_sha]
    return str(max(same)) if same else None


def unchanged(client: MlflowClient, name: str, version: str, test_bleu: float,
              margin: float) -> Promotion:
    """The gate's outcome when this exact model is already registered as `version`."""
    mv = client.get_model_version(name, version)
    before = mv.tags.get("champion_bleu_before", "none")
    return Promotion(name, version, f"models:/{name}/{version}", test_bleu,
                     None, None if before == "none" else float(before), margin, "unchanged",
                     f"identical model already registered as version {version} "
                     f"({mv.tags.get('promotion')} then)",
                     alias_version(client, name, ALIAS_CHAMPION))


def register_and_promote(client: MlflowClient, name: str, model_uri: str, run_id: str | None,
                         test_bleu: float, margin: float,
                         tags: dict[str, str] | None = None) -> Promotion:
    """Register `model_uri` as a new version of `name`, alias it `candidate`, maybe `champion`.

    The champion's BLEU is its version's `test_bleu` tag. The decision is made before the version
    exists and stored in its tags (`test_bleu`, `promotion`, `champion_bleu_before`). If any call
    fails after the version was created, the version is deleted (and the registered model too if
    this call created it) and the previous aliases are restored before the error propagates.
    """
    champion_before = alias_version(client, name, ALIAS_CHAMPION)
    candidate_before = alias_version(client, name, ALIAS_CANDIDATE)
    champion_bleu = _champion_bleu(client, name, champion_before)
    promote, reason = decide_promotion(test_bleu, champion_bleu, margin)
    version_tags = {**(tags or {}), "test_bleu": f"{test_bleu}",
                    "promotion": "promoted" if promote else "kept",
                    "champion_bleu_before": "none" if champion_bleu is None
                    else f"{champion_bleu}"}
    created_model = False
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - create it below
        client.create_registered_model(name, description=DESCRIPTION)
        created_model = True
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = None
    try:
        version = client.create_model_version(name, model_uri, run_id=run_id, tags=version_tags,
                                              model_id=model_id).version
        client.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
        if promote:
            client.set_registered_model_alias(name, ALIAS_CHAMPION, version)
    except BaseException:
        _rollback(client, name, version, created_model,
                  {ALIAS_CANDIDATE: candidate_before, ALIAS_CHAMPION: champion_before})
        raise
    return Promotion(name, str(version), f"models:/{name}/{version}", test_bleu, champion_before,
                     champion_bleu, margin, "promoted" if promote else "kept", reason,
                     str(version) if promote else champion_before)


def _rollback(client: MlflowClient, name: str, version: str | None, created_model: bool,
              aliases: dict[str, str | None]) -> None:
    """Undo a half-finished registration (best effort, logged)."""
    try:
        if created_model:
            client.delete_registered_model(name)
            return
        if version is not None:
            client.delete_model_version(name, version)
        for alias, old in aliases.items():
            if old is not None:
                client.set_registered_model_alias(name, alias, old)
    except Exception:  # noqa: BLE001 - keep the original error
        log.exception("rollback of %s version %s failed; check the registry by hand", name,
                      version)
    else:
        log.warning("registration failed: removed %s version %s, aliases restored", name,
                    version)
