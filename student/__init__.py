"""The student: an open_clip dual encoder, its losses and its trainer."""
