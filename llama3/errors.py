"""The one exception type a user should ever see.

Library code raises `Llama3Error` (or a subclass) for anything the *user* got
wrong: a missing file, a corrupt checkpoint, an unknown preset, an invalid
sampling value.  The message is one line that says what is wrong and what to
do.  The CLI prints it as `error: <message>` and exits with status 2, never a
traceback.  Bugs in our own code stay ordinary exceptions.

`ServiceError` is the one kind that is not the user's doing: the program cannot go on (e.g. a
tensor-parallel peer died).  The CLI treats it like any Llama3Error; the server answers 503.
"""


class Llama3Error(Exception):
    """A user-facing error: one line, what is wrong and what to do."""


class ServiceError(Llama3Error):
    """The service, not the request, failed (a tensor-parallel rank stopped, a collective timed out):
    one line saying what failed and what to do (e.g. restart the server).  HTTP 503, not 400."""


class ConfigError(Llama3Error):
    """A model configuration is unknown, incomplete or contradicts itself."""


class CheckpointError(Llama3Error):
    """A checkpoint is missing, truncated, corrupt or does not match its config."""


def refuse_unknown(keys, known, message: str, error: type[Llama3Error] = Llama3Error) -> None:
    """Raise `error` when `keys` holds a name outside `known`: the one check of every reader of
    user-written settings (config.json, params.json, our own config dicts, training settings).

    `message` is formatted with `unknown` and `known` (both sorted lists), e.g.
    "params.json has unknown keys {unknown}; this loader knows {known}".
    """
    unknown = sorted(set(keys) - set(known), key=str)
    if unknown:
        raise error(message.format(unknown=unknown, known=sorted(known, key=str)))
