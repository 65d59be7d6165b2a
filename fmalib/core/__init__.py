"""The floor every layer stands on: errors, params, atomic cache files, devices, label-id conventions."""
