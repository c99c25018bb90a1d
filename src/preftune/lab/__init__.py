"""The lab: worlds with a gold reward (`worlds`), the controlled comparison of every method
(`run`: `preftune lab`), policy evaluation (`evaluate`) and the report (`report`)."""
