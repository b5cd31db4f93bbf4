"""Image intake: safe fetching of links and bytes -> a small RGB image for the model."""
