"""Stage trainers: stage 1 (SubLN + conversion), stage 1.9, stage 2, and the pipeline that chains them."""
