# CPU and peak RSS of the gateway against points (benches/scale.dat, from scripts/bench-scale;
# benches/README.md "Scale"). Run: gnuplot benches/scale.gp  (writes benches/scale.png)
set terminal pngcairo size 900,500 noenhanced
set output 'benches/scale.png'
set title 'fieldbridge, Modbus TCP at 1 s, per-device JSON (2 cores, loaded machine)'
set xlabel 'points'
set ylabel 'CPU % of one core'
set y2label 'MiB'
set ytics nomirror
set y2tics
set key left top
set grid
set datafile missing '?'
plot 'benches/scale.dat' using 1:2 with linespoints title 'CPU %' axes x1y1, \
     '' using 1:3 with linespoints title 'peak RSS (VmHWM) MiB' axes x1y2, \
     '' using 1:4 with linespoints title 'RSS at the end MiB' axes x1y2
