"""What a missing expert does instead: miss policies, the buddy table (calibration) and `localmoe eval`."""
