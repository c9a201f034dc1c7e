"""Sub-commands of the ``uepo`` CLI (see ``sb3_uepo.cli``)."""
