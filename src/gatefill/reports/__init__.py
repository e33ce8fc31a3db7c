"""The report writers: one module per phase, each writing that phase's files from the result the phase returned
(phases compute, these write). Rendering and file helpers are in ``gatefill.artifacts``."""
