"""The export stage, one module per concept: `programs` (torch.export programs, shipped runner and
search code), `parity` (the parity gate), `pyfunc` (MLflow pyfunc and its content hash), `stage`
(the stage itself); the registry (aliases, promotion gate, rollback) is `nmt.registry`.
"""

from __future__ import annotations

from nmt.export.errors import ExportError
from nmt.export.stage import ExportResult, export

__all__ = ["ExportError", "ExportResult", "export"]
