module pyramid-example

go 1.18

require pyramid v0.0.0

// The binding in this checkout; a program elsewhere points at its own copy the same way.
replace pyramid => ../../bindings/go
