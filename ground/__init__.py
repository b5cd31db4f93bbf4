"""The ground floor: the plain values every part of idefics-bot shares (conversation keys, authors,
turns and their parts, attachments, images as the model takes them, reply events, the command table)
and the one careful file reader. It imports nothing of ours, so anything may import it."""
