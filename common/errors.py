"""Typed errors: each says what is wrong and how to fix it."""

from __future__ import annotations


class FedfuseError(Exception):
    """Base class of every error fedfuse raises on purpose."""


class ConfigError(FedfuseError, ValueError):
    """A configuration key is unknown, missing or has a bad value."""


class EncoderError(ConfigError):
    """An encoder named in the run config cannot be used: unknown, not allowed at this site, or refused by
    its checks (common/model/validation.py). The text depends on the encoder and the schema only."""


class SchemaError(FedfuseError, ValueError):
    """A dataset schema is malformed or disagrees with the data."""


class DataError(FedfuseError, ValueError):
    """Data does not match its schema (shapes, dtypes, labels, presence)."""


class PrivacyParameterError(FedfuseError, ValueError):
    """Privacy parameters are invalid (epsilon <= 0, delta outside (0, 1), ...)."""


class BudgetExhaustedError(FedfuseError):
    """Training this round would take a client's epsilon over its budget.

    Raised before any training happens: nothing was computed on the data.
    """

    def __init__(self, message: str, *, epsilon_now: float, epsilon_after: float, budget: float):
        super().__init__(message)
        self.epsilon_now = epsilon_now
        self.epsilon_after = epsilon_after
        self.budget = budget


class NonPrivateHistoryError(BudgetExhaustedError):
    """A private round was asked of a client that already trained without DP: its epsilon is infinite.

    Raised before any training happens, like every BudgetExhaustedError.
    """

    def __init__(self, message: str, *, budget: float):
        super().__init__(message, epsilon_now=float("inf"), epsilon_after=float("inf"), budget=budget)


class NonFiniteError(FedfuseError, ArithmeticError):
    """A loss or an update became NaN or infinite."""


class GlobalParametersError(FedfuseError, ValueError):
    """The parameters the server sent are not this client's model's, or not finite and bounded.

    Raised before any data is touched: nothing was computed on the data and nothing is charged.
    """
