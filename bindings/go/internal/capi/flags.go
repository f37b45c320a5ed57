// Package capi is the raw layer over include/pyramid.h that SWIG generates from capi.swig
// (which includes bindings/pyramid.i) each time the go tool builds this package. Package
// pyramid is the API; nothing else should import this one.
package capi

// The -I flags serve both SWIG (pyramid.i, pyramid.h) and the C compiler. libpyramid is
// found on the linker's default path, or through CGO_LDFLAGS=-L<dir> (ctest and the example
// target set it to the build tree's lib/).

// #cgo CFLAGS: -I${SRCDIR}/../../.. -I${SRCDIR}/../../../../include
// #cgo LDFLAGS: -lpyramid
import "C"
