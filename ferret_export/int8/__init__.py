"""INT8: calibration images drawn and decoded once, the Q/DQ graph, and post-training quantisation held
to a label-agreement floor against the fp32 graph."""
