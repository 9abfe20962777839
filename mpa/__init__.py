"""What engineers touch: the approvals API and page, the ``mpa`` CLI, audit and notifications."""
