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
# What a frozen coordinate holds (`freezing.ParameterFreezing(frozen_value=...)`, --frozen_value):
# "zero" prunes it (exactly 0 for the whole run); "keep" leaves its pre-trained value.
FROZEN_ZERO = "zero"
FROZEN_KEEP = "keep"
FROZEN_VALUES = (FROZEN_ZERO, FROZEN_KEEP)
