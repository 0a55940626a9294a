"""The one exception type users see. Its message is a single line that says what to do."""


class SurgeryError(Exception):
    """A problem the user can fix: a bad argument, a selector matching nothing, a wrong file."""
