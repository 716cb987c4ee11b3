"""The errors mosaicrt raises for bad input. The CLI turns each into one line and exit code 2."""


class MosaicError(Exception):
    """Base class: the message says what is wrong, the observed value, and what to do."""


class ConfigError(MosaicError):
    """A config.json or preset that does not describe a valid model."""


class CheckpointError(MosaicError):
    """A missing, corrupt or mismatched checkpoint."""


class InputError(MosaicError):
    """Token ids, prompts or files that the model cannot take."""


class CapacityError(MosaicError):
    """A request that does not fit the configured context or batch capacity."""


class BackendError(MosaicError):
    """An unknown or unavailable backend."""
