"""What people see: rich reporters for the terminal and matplotlib figures (the core never imports these)."""
