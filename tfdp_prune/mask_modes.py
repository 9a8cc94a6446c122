"""The mask modes, one list: how often a run chooses its update masks from public data.

The mask callbacks declare their mode from here (`freezing.ParameterFreezing.mask_mode`,
`selection.ParameterSelection.mask_mode`); the config, the flags, the mask provenance and the
privacy metadata all accept these names and no others.
"""

NONE = "none"  # dense DP-SGD: no masks
FREEZE = "freeze"  # one mask chosen before DP training (`freezing.ParameterFreezing`)
SELECT = "select"  # a new mask every k steps (`selection.ParameterSelection`)
MASKED = (FREEZE, SELECT)  # the modes of the mask callbacks
ALL = (NONE,) + MASKED
