"""The ground floor shared by api/ and worker/: it imports nothing of ours above it."""
