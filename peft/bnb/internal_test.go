package bnb

import "testing"

// pythonFloat writes what Python's repr(float) writes (json.dumps uses it for nested_offset).
func TestPythonFloat(t *testing.T) {
	for _, tc := range []struct {
		in   float64
		want string
	}{
		{0, "0.0"},
		{1, "1.0"},
		{-2.5, "-2.5"},
		{100, "100.0"},
		{0.0001, "0.0001"},
		{1e-05, "1e-05"},
		{1.5e-07, "1.5e-07"},
		{float64(float32(0.03472468629479408)), "0.03472468629479408"},
		{123456789012345678, "1.2345678901234568e+17"},
		{1e16, "1e+16"},
		{1234567890123456.0, "1234567890123456.0"},
	} {
		if got := pythonFloat(tc.in); got != tc.want {
			t.Errorf("pythonFloat(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
