module pyramid

go 1.18
