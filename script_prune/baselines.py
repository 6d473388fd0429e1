"""Baseline pruning methods from other papers (DivPrune, VisionZip, FastV, TRIM, CDPruner), registered in the method registry."""
