package pyramid

import (
	"fmt"

	"pyramid/internal/capi"
)

// Status is a pyr_status: StatusOK, StatusDone, StatusCancelled, or an error (negative).
// A Status is also an error value to match with errors.Is:
//
//	if errors.Is(err, pyramid.StatusIO) { ... }
type Status int

// The values of pyr_status (include/pyramid.h; part of the ABI).
const (
	StatusOK              Status = 0
	StatusDone            Status = 1
	StatusCancelled       Status = 2
	StatusInvalidArgument Status = -1
	StatusIO              Status = -2
	StatusFormat          Status = -3
	StatusUnsupported     Status = -4
	StatusOutOfMemory     Status = -5
	StatusContextFull     Status = -6
	StatusState           Status = -7
	StatusInternal        Status = -8
)

// String is the library's short description ("ok", "i/o error", ...).
func (s Status) String() string {
	return capi.Pyr_status_str(capi.Enum_SS_pyr_status(s))
}

func (s Status) Error() string {
	return "pyramid: " + s.String()
}

// Error is a failed call: its Status and the library's message for it (pyr_engine_errmsg or
// pyr_session_errmsg). When a context stopped a generation, errors.Is(err, ctx.Err()) holds.
type Error struct {
	Status  Status
	Message string
	cause   error
}

func (e *Error) Error() string {
	return fmt.Sprintf("pyramid: %s [%s]", e.Message, e.Status)
}

// Is makes errors.Is(err, pyramid.StatusCancelled) and the like work.
func (e *Error) Is(target error) bool {
	s, ok := target.(Status)
	return ok && s == e.Status
}

func (e *Error) Unwrap() error {
	return e.cause
}

func closedError(what string) error {
	return &Error{Status: StatusState, Message: "the " + what + " is closed"}
}
