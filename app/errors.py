"""User-facing errors. Each carries an English and a Chinese message and a CLI exit code.

Exit codes (docs/install.md lists them with the launcher's own):
  0 success · 1 unexpected error · 2 bad input or usage · 3 model missing or broken
  4 out of GPU memory · 5 cancelled · 6 configuration error · 130 interrupted (Ctrl+C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_MODEL_MISSING = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_CANCELLED = 5
EXIT_CONFIG = 6
EXIT_INTERRUPTED = 130


class AppError(Exception):
    """An error the user can act on, in English and Chinese."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, en: str, zh: str | None = None):
        super().__init__(en)
        self.en = en
        self.zh = zh or en

    def message(self, lang: str = "en") -> str:
        return self.zh if lang.lower().startswith("zh") else self.en


class InputError(AppError):
    """Bad input: an image that can't be read, a parameter outside its limits."""

    exit_code = EXIT_BAD_INPUT


class ModelMissingError(AppError):
    """The weights are not on disk and can't be fetched, or they are broken."""

    exit_code = EXIT_MODEL_MISSING


class OutOfMemoryError(AppError):
    """The GPU ran out of memory; the message says what to lower."""

    exit_code = EXIT_OUT_OF_MEMORY


class CancelledError(AppError):
    """The user cancelled the run; no file was written."""

    exit_code = EXIT_CANCELLED

    def __init__(self, en: str = "Cancelled by the user; no video was written.",
                 zh: str = "已取消,未写入视频。"):
        super().__init__(en, zh)


class ModelNotReadyError(AppError):
    """The model is still loading or failed to load."""

    exit_code = EXIT_MODEL_MISSING
