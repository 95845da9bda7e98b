package peft

import (
	"errors"
	"fmt"
)

// catch runs fn and turns a panic raised inside it (GoMLX reports graph-building errors as panics)
// into an error prefixed with what, so our public API returns errors instead of panicking.
func catch(what string, fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			switch e := r.(type) {
			case error:
				err = fmt.Errorf("%s: %w", what, e)
			default:
				err = fmt.Errorf("%s: %v", what, e)
			}
		}
	}()
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Catch runs fn and returns any panic raised inside it as an error. Method packages use it at
// their API boundary, where they build and run graphs.
func Catch(what string, fn func() error) error { return catch(what, fn) }

// ErrMerged is returned when an operation needs the method's update unmerged (training, saving)
// while it is merged into the base weights.
var ErrMerged = errors.New("peft: the method is merged into the base weights; call Unmerge first")

// trimmedError is err said with a shorter message (a prefix the caller adds again removed),
// unwrapping to err so that errors.Is and As still see it.
type trimmedError struct {
	msg string
	err error
}

func (e trimmedError) Error() string { return e.msg }
func (e trimmedError) Unwrap() error { return e.err }
