"""PRORec for RecBole."""
