//go:build race

package goexec

// RaceDetector is true in builds with the race detector (go test -race), where
// RunOpsInParallel keeps ops sequential.
const RaceDetector = true
