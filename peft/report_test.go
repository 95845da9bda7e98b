package peft_test

import (
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft"
)

func TestThousands(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0"},
		{7, "7"},
		{999, "999"},
		{1000, "1,000"},
		{12345, "12,345"},
		{999999, "999,999"},
		{1234567, "1,234,567"},
		{-5, "-5"},
		{-999, "-999"},
		{-1000, "-1,000"},
		{-1234567, "-1,234,567"},
		{math.MaxInt64, "9,223,372,036,854,775,807"},
		{math.MinInt64, "-9,223,372,036,854,775,808"},
	} {
		require.Equal(t, tc.want, peft.Thousands(tc.n), "Thousands(%d)", tc.n)
	}
}

func TestParamReport(t *testing.T) {
	for _, tc := range []struct {
		report  peft.ParamReport
		percent float64
		want    string
	}{
		// 100·294912/125239296 = 0.235478…
		{peft.ParamReport{Trainable: 294_912, All: 125_239_296}, 0.23547880690737832,
			"trainable params: 294,912 || all params: 125,239,296 || trainable%: 0.2355"},
		{peft.ParamReport{Trainable: 1, All: 3}, 100.0 / 3,
			"trainable params: 1 || all params: 3 || trainable%: 33.3333"},
		{peft.ParamReport{Trainable: 1000, All: 1000}, 100,
			"trainable params: 1,000 || all params: 1,000 || trainable%: 100.0000"},
		// No parameters at all: 0 %, not NaN.
		{peft.ParamReport{}, 0, "trainable params: 0 || all params: 0 || trainable%: 0.0000"},
	} {
		require.InDelta(t, tc.percent, tc.report.Percent(), 1e-12)
		require.Equal(t, tc.want, tc.report.String())
	}
}
