"""The embedded demo model: a captioned-shapes data set, its checker, and the training recipe."""
