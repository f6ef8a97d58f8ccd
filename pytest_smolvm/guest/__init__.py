"""Exec channels into the guest: the framed protocol, the guest agent and the host client."""
