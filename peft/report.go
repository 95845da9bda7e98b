package peft

import (
	"fmt"
	"strconv"
)

// ParamReport counts a model's parameters with a method applied.
type ParamReport struct {
	Trainable int64
	All       int64
}

// Percent is the trainable share in percent.
func (r ParamReport) Percent() float64 {
	if r.All == 0 {
		return 0
	}
	return 100 * float64(r.Trainable) / float64(r.All)
}

// String prints the report in the format Hugging Face PEFT users know:
// "trainable params: 294,912 || all params: 124,942,080 || trainable%: 0.2360".
func (r ParamReport) String() string {
	return fmt.Sprintf("trainable params: %s || all params: %s || trainable%%: %.4f",
		Thousands(r.Trainable), Thousands(r.All), r.Percent())
}

// Thousands formats n with comma thousands separators.
func Thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := n < 0
	if neg {
		s = s[1:]
	}
	out := make([]byte, 0, len(s)+len(s)/3)
	for i, c := range []byte(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, c)
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}
