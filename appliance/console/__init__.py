"""The operator console (`appliance console`): a Textual app, a client of the service alone.

Importing this package does not import textual: `session` (grants, errors, formatting) is the
UI-free core; `app` and the panes need the ``console`` extra.
"""
