// Package plot draws line charts as PNG files: loss curves of fine-tuning runs, one line per
// method, so a person sees at a glance which method learned fastest. It needs nothing beyond
// the standard library and golang.org/x/image's built-in bitmap font.
package plot

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"strconv"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"

	"peft/peft/atomicfile"
)

// Series is one line of a chart.
type Series struct {
	Name   string
	Values []float64
}

// Chart describes a line chart: the y values of each series are plotted against their index
// (the training step, from 1).
type Chart struct {
	Title, XLabel, YLabel string
	Series                []Series
	// Width and Height in pixels. Default 900×560.
	Width, Height int
	// Smooth averages each value with its neighbours over a window of this many steps (0 or 1:
	// none), which makes noisy per-step losses readable.
	Smooth int
}

// palette is a set of colours that stay distinguishable on white.
var palette = []color.RGBA{
	{31, 119, 180, 255}, {255, 127, 14, 255}, {44, 160, 44, 255}, {214, 39, 40, 255},
	{148, 103, 189, 255}, {140, 86, 75, 255}, {227, 119, 194, 255}, {127, 127, 127, 255},
}

// WritePNG renders the chart and writes it atomically to path.
func (c Chart) WritePNG(path string) error {
	img, err := c.Render()
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return err
	}
	return atomicfile.Write(path, buf.Bytes())
}

// Render draws the chart. It is an error if no series has a finite value.
func (c Chart) Render() (*image.RGBA, error) {
	width, height := c.Width, c.Height
	if width <= 0 {
		width = 900
	}
	if height <= 0 {
		height = 560
	}
	series := make([]Series, len(c.Series))
	minY, maxY, maxN := math.Inf(1), math.Inf(-1), 0
	for i, s := range c.Series {
		series[i] = Series{Name: s.Name, Values: smooth(s.Values, c.Smooth)}
		for _, v := range series[i].Values {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				minY, maxY = math.Min(minY, v), math.Max(maxY, v)
			}
		}
		maxN = max(maxN, len(s.Values))
	}
	if math.IsInf(minY, 1) {
		return nil, fmt.Errorf("plot: %q has no finite values to draw", c.Title)
	}
	if maxY == minY {
		maxY = minY + 1
	}
	pad := (maxY - minY) * 0.05
	minY, maxY = minY-pad, maxY+pad

	img := image.NewRGBA(image.Rect(0, 0, width, height))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	left, right, top, bottom := 70, width-190, 52, height-50
	grey := color.RGBA{200, 200, 200, 255}
	black := color.RGBA{0, 0, 0, 255}

	xOf := func(i int) float64 {
		if maxN <= 1 {
			return float64(left)
		}
		return float64(left) + float64(i)*float64(right-left)/float64(maxN-1)
	}
	yOf := func(v float64) float64 { return float64(bottom) - (v-minY)/(maxY-minY)*float64(bottom-top) }

	// Grid and tick labels.
	for k := 0; k <= 5; k++ {
		v := minY + float64(k)*(maxY-minY)/5
		y := int(yOf(v))
		line(img, float64(left), float64(y), float64(right), float64(y), grey)
		text(img, 5, y+4, strconv.FormatFloat(v, 'g', 3, 64), black)
		xi := k * (maxN - 1) / 5
		x := int(xOf(xi))
		line(img, float64(x), float64(top), float64(x), float64(bottom), grey)
		text(img, x-10, bottom+16, strconv.Itoa(xi+1), black)
	}
	line(img, float64(left), float64(bottom), float64(right), float64(bottom), black)
	line(img, float64(left), float64(top), float64(left), float64(bottom), black)
	text(img, left, 18, c.Title, black)
	text(img, (left+right)/2-len(c.XLabel)*3, height-12, c.XLabel, black)
	text(img, 5, top-14, c.YLabel, black)

	for i, s := range series {
		col := palette[i%len(palette)]
		for j := 1; j < len(s.Values); j++ {
			a, b := s.Values[j-1], s.Values[j]
			if math.IsNaN(a) || math.IsNaN(b) || math.IsInf(a, 0) || math.IsInf(b, 0) {
				continue
			}
			thickLine(img, xOf(j-1), yOf(a), xOf(j), yOf(b), col)
		}
		y := top + 10 + 20*i
		thickLine(img, float64(right+15), float64(y), float64(right+40), float64(y), col)
		text(img, right+46, y+4, s.Name, black)
	}
	return img, nil
}

// smooth returns the centred moving average of values over window steps.
func smooth(values []float64, window int) []float64 {
	if window <= 1 {
		return values
	}
	out := make([]float64, len(values))
	for i := range values {
		lo, hi := max(0, i-window/2), min(len(values), i+window/2+1)
		var sum float64
		n := 0
		for _, v := range values[lo:hi] {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				sum += v
				n++
			}
		}
		out[i] = math.NaN()
		if n > 0 {
			out[i] = sum / float64(n)
		}
	}
	return out
}

func text(img *image.RGBA, x, y int, s string, col color.Color) {
	d := &font.Drawer{Dst: img, Src: image.NewUniform(col), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

// line draws a one-pixel line from (x0, y0) to (x1, y1).
func line(img *image.RGBA, x0, y0, x1, y1 float64, col color.RGBA) {
	steps := int(math.Max(math.Abs(x1-x0), math.Abs(y1-y0))) + 1
	for k := 0; k <= steps; k++ {
		t := float64(k) / float64(steps)
		img.SetRGBA(int(math.Round(x0+t*(x1-x0))), int(math.Round(y0+t*(y1-y0))), col)
	}
}

func thickLine(img *image.RGBA, x0, y0, x1, y1 float64, col color.RGBA) {
	for _, d := range [][2]float64{{0, 0}, {1, 0}, {0, 1}} {
		line(img, x0+d[0], y0+d[1], x1+d[0], y1+d[1], col)
	}
}
