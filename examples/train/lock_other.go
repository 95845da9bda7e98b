//go:build !unix

package main

// lockFolder does nothing where flock is not available: run one command per -out.
func lockFolder(string) (func(), error) { return func() {}, nil }
