"""Base models and the networks beside them: loading SD 1.5 from a hub id, a diffusers folder or a single file and
checking one without loading it (loading), LDM ⇄ diffusers key conversion (ldm_convert), ControlNets (controlnets),
the control-image preprocessors and their lineart network (preprocessors, lineart) and the tiny random demo model
(demo).
"""
