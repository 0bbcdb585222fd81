"""The TRL releases this package supports, checked when it is imported.

The trainers mirror TRL internals hashed per TRL release (`gvm_trl.trl_compat`), so a TRL outside the range is refused
at `import gvm_trl`, naming the range and the fix, instead of failing later inside a mirrored method.
`GVM_TRL_ALLOW_UNSUPPORTED_TRL=1` turns the refusal into a warning: for porting to a new TRL release, where
`tests/test_trl_compat.py` names the mirrors to re-read.
"""

from __future__ import annotations

import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_TRL = ">=1.16,<1.17"  # pyproject.toml declares the same (tests/test_packaging.py checks)
ALLOW_UNSUPPORTED_TRL = "GVM_TRL_ALLOW_UNSUPPORTED_TRL"


def unsupported_trl_message(trl_version: str) -> str | None:
    """Why `trl_version` cannot run this package's trainers and what to do, or None when it is supported."""
    try:
        if SpecifierSet(SUPPORTED_TRL).contains(Version(trl_version), prereleases=True):
            return None
    except InvalidVersion:
        pass
    return (
        f"gvm-trl supports trl{SUPPORTED_TRL}, but trl {trl_version} is installed: its trainers override TRL internals "
        f'checked release by release. Fix: pip install "trl{SUPPORTED_TRL}", or upgrade gvm-trl to a release that '
        f"supports trl {trl_version}. (Set {ALLOW_UNSUPPORTED_TRL}=1 to import it anyway, e.g. to port it.)"
    )


def check_trl_version() -> None:
    """Refuse the installed TRL unless it is in SUPPORTED_TRL (a warning with GVM_TRL_ALLOW_UNSUPPORTED_TRL=1)."""
    import trl

    message = unsupported_trl_message(trl.__version__)
    if message is None:
        return
    if os.environ.get(ALLOW_UNSUPPORTED_TRL) == "1":
        warnings.warn(message, stacklevel=3)
        return
    raise ImportError(message)
